"""Pure PyTorch ELMo: tokenizer, vocabulary, biLM, layer mixes, classifier and training loops.

This package imports torch, numpy and the standard library only (a test enforces it), so the
model can be used and tested without the pipeline around it.
"""
