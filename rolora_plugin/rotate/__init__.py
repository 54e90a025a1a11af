"""Layer 4, rotation: ``RotationConfig`` and its presets (:mod:`.config`), ``rotate_model_`` and its record
(:mod:`.rotation`), Mixture-of-Experts rotation (:mod:`.moe`), learned R1/R2 (:mod:`.learned`, whose objective is
a W4A4 error from :mod:`rolora_plugin.quant`) and the base-weights fingerprint (:mod:`.fingerprint`).
Reads and writes no files: that is :mod:`rolora_plugin.io`.
"""
