"""mbcompile: an ahead-of-time compiler for MobileBERT.

Public API (imports of torch/transformers happen only inside ``compile``)::

    compiled = mbcompile.compile(model, seq_len=128, target="host")
    out = compiled(input_ids=ids, attention_mask=mask)
    compiled.save("model.mbc")
    again = mbcompile.load("model.mbc")        # numpy + TVM only
"""

__version__ = "0.1.0"
