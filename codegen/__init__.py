"""Code generation for daemoneye-eventbus.

``python -m codegen gen`` compiles ``proto/`` with protoc (from grpcio-tools)
and mypy-protobuf, then renders the typed topic registry from the compiled
descriptors. ``python -m codegen check`` does the same into a temporary
directory and fails if the committed ``generated/`` differs.
"""
