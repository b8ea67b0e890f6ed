"""Pack builder: base model (GGUF or HF directory) -> fused ONNX graph -> int8 -> evaluated pack.

Data flow, one module each: ``source`` reads weights and tokenizer into a common form,
``quantize`` makes blockwise int8 blocks, ``graph`` writes the ONNX graph (float reference
or quantized), ``evaluate`` compares the two, ``builder`` orchestrates and writes the pack.
"""
