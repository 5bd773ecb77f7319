"""bict-ray: Bidirectional Compatible Training (BiCT) for privacy-preserving model upgrades, on Ray."""

__version__ = "0.1.0"
