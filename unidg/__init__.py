"""UniDG: universal defect-image generation, packaged for deployment.

Subpackages: ``unidg.runtime`` (lean, no torch), ``unidg.train``, ``unidg.export``, ``unidg.calib``.
"""

__version__ = "0.1.0"
