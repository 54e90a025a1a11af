"""Layer 6, files: everything that reads or writes a checkpoint. The loader of user checkpoints
(:mod:`.loading`, :mod:`.safetensors_reader`), the one atomic publisher (:mod:`.publish`), the rotation record's
files and learned matrices (:mod:`.records`), an export's seal (:mod:`.integrity`), merged and packed exports
(:mod:`.export`, :mod:`.compressed`, :mod:`.transform_config`), streaming rotation of a checkpoint
(:mod:`.streaming`) and the consumer-side check (:mod:`.check`).
"""
