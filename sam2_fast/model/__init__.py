"""The model: Hiera trunk, FPN neck, sine position encoding and the image encoder, with sam2's constructor arguments
and state_dict keys, computed through the ops (``sam2_fast.ops``) and the GEMM paths (``sam2_fast.gemm``); ``build``
makes one from a config name and a checkpoint."""
