"""Distributed training of the Keras MNIST lab's ConvNets on Apache Spark."""

__version__ = "0.1.0"
