"""An offline Hugging Face cache holding the few hub repositories LAVIS asks for, with tiny local contents.

LAVIS calls ``BertTokenizer.from_pretrained("bert-base-uncased")`` (BLIP, BLIP-2) and, for BLIP-2's Q-Former,
``BertConfig.from_pretrained`` and ``BertLMHeadModel.from_pretrained`` of the same name; BLIP-2 also loads its OPT or
T5 language model by name. :func:`write_offline_hub` writes a cache in the hub's layout
(``<root>/hub/models--<org>--<name>/{refs/main, snapshots/<rev>/...}``) with:

- ``bert-base-uncased``: the local WordPiece tokenizer and a BERT of size ``bert_size`` with random weights
  (``tiny``: the size of ``configs/models/med_config_tiny.json``; ``base``: bert-base's real size, for benchmarks);
- ``lavis-accel/tiny-opt``: a tiny random ``OPTForCausalLM`` with the local OPT tokenizer;
- ``lavis-accel/tiny-flan-t5``: a tiny random ``T5ForConditionalGeneration`` (Flan-T5's layout) with the local T5
  tokenizer.

transformers reads its cache location and offline switch **once, when it is imported**. So the variables of
:func:`offline_env` must be in the environment before anything imports transformers (``import lavis_accel`` does):
pass them to a subprocess (``subprocess.run(..., env={**os.environ, **offline_env(root)})``) or set them at the top of
a script or ``conftest.py`` before other imports. :func:`activate_offline_hub` sets them in this process and refuses,
in one line, if transformers was already imported with another cache. The user's own cache is never read or written.
"""
import hashlib
import json
import os
import sys

from lavis_accel.testing import tokenizers

BERT_REPO = "bert-base-uncased"
TINY_OPT_REPO = "lavis-accel/tiny-opt"
TINY_T5_REPO = "lavis-accel/tiny-flan-t5"

TINY_BERT_VOCAB_SIZE = 1024  # med_config_tiny.json's vocab_size is this + 2 ([DEC] and [ENC], added by BLIP)
BASE_BERT_VOCAB_SIZE = 30522  # bert-base-uncased
BERT_SIZES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 512},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
TINY_OPT_SIZE = {"hidden_size": 64, "word_embed_proj_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "ffn_dim": 256, "max_position_embeddings": 256}
TINY_T5_SIZE = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4}

MARKER_FILE = "lavis_accel_hub.json"
_REVISION = hashlib.sha1(b"lavis_accel offline hub").hexdigest()


def offline_env(root):
    """The environment variables that point transformers and huggingface_hub at the hub under ``root``, offline."""
    root = os.path.abspath(root)
    cache = os.path.join(root, "hub")
    return {
        "HF_HOME": root,
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "TRANSFORMERS_CACHE": cache,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def activate_offline_hub(root):
    """Set :func:`offline_env` in ``os.environ``; fail if transformers is already imported with another cache."""
    env = offline_env(root)
    if "transformers" in sys.modules:
        from transformers.utils import hub as transformers_hub

        if (os.path.abspath(transformers_hub.TRANSFORMERS_CACHE) != env["TRANSFORMERS_CACHE"]
                or not transformers_hub.is_offline_mode()):
            raise RuntimeError("offline hub: transformers was imported before offline_env() was set; set it in the "
                               "environment of a new process, before importing lavis_accel or transformers")
    os.environ.update(env)


def active_hub():
    """The settings (``root``, ``bert_size``, ``bert_vocab_size``) of the offline hub transformers uses, or None."""
    from transformers.utils import hub as transformers_hub

    marker = os.path.join(os.path.dirname(os.path.abspath(transformers_hub.TRANSFORMERS_CACHE)), MARKER_FILE)
    if not (transformers_hub.is_offline_mode() and os.path.isfile(marker)):
        return None
    with open(marker, encoding="utf-8") as f:
        return json.load(f)


def snapshot_dir(root, repo_id):
    """The snapshot directory of ``repo_id`` in the hub under ``root`` (where its files live)."""
    name = "models--" + repo_id.replace("/", "--")
    return os.path.join(os.path.abspath(root), "hub", name, "snapshots", _REVISION)


def write_offline_hub(root, *, bert_size="tiny", bert_vocab_size=None):
    """Write the offline hub under ``root`` (created if needed) and return ``root``.

    ``bert_vocab_size`` defaults to 1024 for ``bert_size="tiny"`` and to bert-base-uncased's 30522 for ``"base"``.
    Weights are random but reproducible (seeded), and the global torch RNG is left as it was.
    """
    import torch

    if bert_size not in BERT_SIZES:
        raise ValueError(f"bert_size: '{bert_size}' is not one of {sorted(BERT_SIZES)}")
    if bert_vocab_size is None:
        bert_vocab_size = TINY_BERT_VOCAB_SIZE if bert_size == "tiny" else BASE_BERT_VOCAB_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _write_bert(root, bert_size, bert_vocab_size)
        _write_opt(root)
        _write_t5(root)
    # transformers migrates (and announces) any cache without this file, the first time it is imported
    with open(os.path.join(root, "hub", "version.txt"), "w", encoding="utf-8") as f:
        f.write("1")
    with open(os.path.join(root, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump({"root": os.path.abspath(root), "bert_size": bert_size, "bert_vocab_size": bert_vocab_size}, f)
    return root


def _new_snapshot(root, repo_id):
    directory = snapshot_dir(root, repo_id)
    os.makedirs(directory, exist_ok=True)
    refs = os.path.join(os.path.dirname(os.path.dirname(directory)), "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, "main"), "w", encoding="utf-8") as f:
        f.write(_REVISION)
    return directory


def _write_bert(root, bert_size, vocab_size):
    from transformers import BertConfig, BertForPreTraining

    directory = _new_snapshot(root, BERT_REPO)
    tokenizers.write_bert_tokenizer(directory, vocab_size)
    config = BertConfig(vocab_size=vocab_size, **BERT_SIZES[bert_size])
    BertForPreTraining(config).save_pretrained(directory)


def _write_opt(root):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    directory = _new_snapshot(root, TINY_OPT_REPO)
    tokenizers.write_opt_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=False)
    config = OPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_OPT_SIZE)
    OPTForCausalLM(config).save_pretrained(directory)


def _write_t5(root):
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    directory = _new_snapshot(root, TINY_T5_REPO)
    tokenizers.write_t5_tokenizer(directory)
    tokenizer = T5TokenizerFast.from_pretrained(directory)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY_T5_SIZE)
    T5ForConditionalGeneration(config).save_pretrained(directory)
