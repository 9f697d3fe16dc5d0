"""Checkpoint directories laid out exactly like real Hugging Face snapshots, built in code at tiny sizes.

``build_siglip_dir`` mirrors ``google/siglip-base-patch16-224`` / ``google/medsiglip-448``: a hand-written
``config.json`` of a ``SiglipModel`` (the keys a real snapshot ships, so defaults fill the rest as they do
for the real one), ``model.safetensors``, ``preprocessor_config.json`` (``SiglipImageProcessor``),
``tokenizer_config.json`` + ``special_tokens_map.json`` and a SentencePiece ``spiece.model`` trained here
on the bundled checklists: the slow ``SiglipTokenizer`` path, no ``tokenizer.json``.
"""

from __future__ import annotations

import io
import json
import string
from importlib import resources
from pathlib import Path

SIGLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
                "spiece.model", "tokenizer_config.json")  # fmt: skip
SIGLIP_MAX_LENGTH = 64  # SigLIP's text window (tokenizer model_max_length = text max_position_embeddings)


def corpus() -> list[str]:
    """Every item of every bundled checklist, canonicalised the way ``SiglipTokenizer`` canonicalises input."""
    from craft.annotate.checklists import checklist_text

    root = resources.files("craft.annotate") / "checklists"
    out = []
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            for items in json.loads(f.read_text()).values():
                out += [canonical(checklist_text([item])) for item in items]
    return out


def canonical(text: str) -> str:
    """SigLIP's text canonicalisation (lower case, punctuation removed, spaces collapsed)."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def train_spiece(texts: list[str], vocab_size: int = 300) -> bytes:
    """A unigram SentencePiece model with SigLIP's (T5's) special ids: <pad> 0, </s> 1, <unk> 2, no <s>."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)  # fmt: skip
    return buf.getvalue()


def _special(content: str) -> dict:
    return {"content": content, "lstrip": True, "normalized": False, "rstrip": True, "single_word": False}


def build_siglip_dir(path: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 16,
                     width: int = 32) -> Path:  # fmt: skip
    """Write a tiny, seeded SigLIP snapshot at ``path`` (the files of ``SIGLIP_FILES``); return ``path``."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipConfig, SiglipModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spiece = train_spiece(corpus())
    (path / "spiece.model").write_bytes(spiece)
    vocab = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2, "num_hidden_layers": 1}
    config = {  # the keys of the real siglip-base-patch16-224 config.json, tiny sizes
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {**tower, "model_type": "siglip_text_model", "vocab_size": vocab},
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        "vision_config": {
            **tower,
            "model_type": "siglip_vision_model",
            "image_size": image_size,
            "patch_size": patch_size,
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig.from_pretrained(str(path), local_files_only=True)).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    preprocessor = {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": image_size, "width": image_size},
    }  # fmt: skip
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    special = {"eos_token": _special("</s>"), "pad_token": _special("</s>"), "unk_token": _special("<unk>")}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer = {
        "added_tokens_decoder": {"1": {**_special("</s>"), "special": True}, "2": {**_special("<unk>"), "special": True}},
        "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": SIGLIP_MAX_LENGTH,
        "pad_token": "</s>", "processor_class": "SiglipProcessor", "sp_model_kwargs": {},
        "tokenizer_class": "SiglipTokenizer", "unk_token": "<unk>",
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
    return path
