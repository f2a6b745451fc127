"""Problems for masked image modeling: the losses of each level and how levels read each other.

- ``pretrain.Reconstruction``: the MAE's reconstruction loss under a masking mode (random,
  object_prior, mlo, gumbel); ``MaskingSpec`` makes the masks for every level.
- ``finetune.Classification``: a head on the pretrained encoder's pooled features.
- ``mask.MaskLearning``: the masker's loss, a weighted sum of the downstream validation loss,
  an adversarial term and a reconstruction-feedback term.
- ``discriminator.Discriminator``: AutoMAE's mask discriminator (LSGAN).
- ``toy``: image-free problems (learned L2 penalties) for the engine's example.

Experiments name them by dotted path, e.g. ``target: problems.pretrain.Reconstruction``.
"""
