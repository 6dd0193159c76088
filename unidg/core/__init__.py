"""The contract every stage shares: settings, the diptych layout and its latents, geometry, schedule, attention bias,
images, the UDG format, manifests, staged output folders, errors and weights-folder reading.

It imports nothing from ``unidg.runtime``, ``unidg.train``, ``unidg.export`` or ``unidg.calib`` and never imports torch,
so the lean runtime, training and export all build on it.
"""
