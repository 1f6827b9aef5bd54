"""A small BLIP-2 trained from nothing on procedural scenes, shipped in the package so that blip2 works offline.

``blip2.load("demo")`` is the generation model (captions, questions, chat); ``blip2.load("demo-itm")`` its
stage-1 retrieval model (ITM / ITC; ``blip2 index`` / ``search --model demo`` use it). The recipe is the
paper's in miniature: pre-train a ViT on the scenes and an OPT on their text, freeze both, then train the
Q-Former with ``blip2 train`` (stage 1, then stage 2). ``python -m blip2.demo reproduce`` rebuilds both from
nothing; ``python -m blip2.demo eval --seed S --count N`` scores a model on fresh held-out scenes.

Modules: ``scenes`` (generator), ``pretrain`` (ViT and OPT), ``checkpoint`` (hub-layout writer),
``reproduce`` (the whole recipe), ``evaluate`` (caption exact match, VQA accuracy).
"""
