"""The model definitions, as the architecture runs: ``vision`` (EVA ViT) -> ``qformer`` (queries reading
the image, and for InstructBLIP the prompt) -> the projection and composition in ``blip2`` -> a language
model in ``language/`` (OPT, Flan-T5, LLaMA). ``checkpoint`` finds a checkpoint's folder and ``config``
reads its ``config.json`` (neither needs torch); ``layers`` holds the shared primitives; ``weights`` is the
one place where the hub's tensor names appear."""
