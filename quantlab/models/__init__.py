"""Models: what a reference names, where its weights come from, and how quantlab reads them.

One module per concern, each imported by name (this package re-exports nothing):

- ``source``: a reference (hub id, local HF dir, .gguf file, named model) resolved to a ``ModelSource``;
- ``named``: where a named model's GGUF file is (inside its package, or fetched under QUANTLAB_HOME);
- ``convert``: a GGUF file dequantized once into a cached HF directory;
- ``fingerprint``: the sha256 that names a model's weights, and the cache of large files' sha256;
- ``load``: config, model and tokenizer loading and saving, with quantlab's errors;
- ``shapes``: a config's model built on the meta device, and its linear layers' shapes.
"""
