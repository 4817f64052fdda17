"""imglish: BEiT-3 ("Image as a Foreign Language") in PyTorch."""

__version__ = "0.1.0"
