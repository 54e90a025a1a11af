"""Layer 2, the model as we find it: where a family keeps its embeddings, norms and linears
(:mod:`.architectures`, families added through the ``rolora_register_architectures`` hook) and the hooks we put
inside its forward (:mod:`.online`: transforms before ``down_proj``, inside the attention function and the fused
experts). Used by rotation and quantization alike; imports only :mod:`rolora_plugin.hadamard` and the foundation.
"""
