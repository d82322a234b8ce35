"""Export AcmeVLM the way the converter reads it: weights, config.json, tokenizer, image settings."""
import json
from pathlib import Path

from safetensors.torch import save_file

from mmjax.testing.tokenizers import build_tiny_tokenizer, save_tokenizer_folder


def save_acme_checkpoint(folder, torch_model) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # 1. weights: the plain state dict, under the model's own tensor names
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(folder / "model.safetensors"))
    # 2. config.json: the model's own keys, plus a model_type of its own
    (folder / "config.json").write_text(json.dumps(torch_model.config, indent=2))
    # 3. tokenizer files (a real project copies its own; this one trains a tiny BPE in-process)
    tok = build_tiny_tokenizer(torch_model.config["vocab"], ["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    assert tok.token_to_id("<image>") == torch_model.config["image_token_id"]
    save_tokenizer_folder(tok, folder, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    # 4. image preprocessing, in HF's preprocessor_config.json keys (resize, crop, normalise)
    size = torch_model.config["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2))
    return folder
