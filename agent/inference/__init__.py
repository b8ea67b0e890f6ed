"""On-device inference: onnxruntime + tokenizers + numpy, nothing else.

``pack`` loads and checks a model pack, ``tokenizer`` encodes prompts and decodes
streams safely, ``prompts`` renders the pack's chat template, ``sampling`` picks tokens,
``engine`` runs the graph with a KV cache that is never copied.
"""

from agent.inference.engine import Completion, Engine, GenerationRequest, Usage
from agent.inference.pack import LoadedPack, load_pack

__all__ = ["Completion", "Engine", "GenerationRequest", "LoadedPack", "Usage", "load_pack"]
