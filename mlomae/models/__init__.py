"""Plain ``nn.Module``s and tensor functions for masked image modeling; nothing here reads YAML.

- ``masking``: every masking mode, returning one ``Masking`` (mask, ids_keep, ids_restore, weights)
- ``mae``: ``MaskedAutoencoder`` (timm blocks, timm-compatible encoder keys)
- ``attention``: switch timm's fused attention (for double backward), read attention maps
- ``maskers``: MLO-MAE maskers and AutoMAE's ``AttentionMaskGenerator``
- ``discriminator``: AutoMAE's ``MaskDiscriminator`` and LSGAN losses
- ``heads``: linear / MLP classification heads
- ``toy``: tiny modules for image-free examples
"""
