"""The torch modules a :class:`~models.spec.ConvNetSpec` describes; only the workers import this."""

from models.nets.convnet import ConvNet, build_model

__all__ = ["ConvNet", "build_model"]
