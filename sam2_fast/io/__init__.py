"""Everything read from outside: the eight encoder configs (``configs``), sam2's hydra configs pointing at sam2_fast
(``sam2_configs``), checkpoints and their formats (``checkpoint``, ``checkpoint_formats``), and images (``images``)."""
