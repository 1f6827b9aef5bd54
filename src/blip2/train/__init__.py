"""Training: Q-Former pre-training (stage 1 representation, stage 2 generation) and fine-tuning.

Never imported by the inference path. Entry points: :func:`blip2.train.loop.train` with a
:class:`~blip2.train.loop.TrainConfig`, or ``blip2 train …`` (``blip2.train.cli``).
"""
