"""Default configuration files, installed with the package as ``sparkml_mnist.conf``."""
