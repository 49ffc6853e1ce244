"""Small tokenizers written to local directories, loadable with transformers' ``from_pretrained(dir)``.

LAVIS downloads its tokenizers (bert-base-uncased, OPT, Flan-T5) from a model hub; offline, tests and the demo use
these instead. Each vocabulary covers the words of the plugin's synthetic datasets (colours, shapes, positions,
numbers, question words) so those texts tokenize into whole words, and falls back to characters or bytes for any
other text.

- :func:`write_bert_tokenizer`: a WordPiece ``vocab.txt`` for ``BertTokenizer`` (BLIP, BLIP-2's Q-Former), at an
  exact size if asked (``30522`` matches bert-base-uncased, so embedding and LM-head costs are the real ones).
- :func:`write_opt_tokenizer`: a byte-level BPE for ``GPT2Tokenizer``, with OPT's special tokens and ids.
- :func:`write_t5_tokenizer`: a sentencepiece-style ``tokenizer.json`` for ``T5TokenizerFast``, with T5's special
  tokens and ids.
"""
import json
import os
import string

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "grey",
           "cyan", "magenta"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "diamond", "hexagon", "pentagon", "cross", "heart",
          "ellipse", "oval", "shape", "object", "thing"]
POSITIONS = ["left", "right", "top", "bottom", "center", "centre", "middle", "upper", "lower", "corner", "side",
             "above", "below", "beside", "next", "near", "far", "between", "under", "over"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "pair",
           "none", "no", "several", "many"] + [str(n) for n in range(11)]
PHRASES = [
    "a picture of", "a photo of", "an image of", "question", "answer", "yes", "no", "true", "false",
    "how many shapes are there", "what color is the shape", "what colour is it", "is there a shape",
    "are there any", "which side", "where is the", "the left image", "the right image", "both images",
    "there is", "there are", "it is", "this is", "that is", "in the", "on the", "at the", "of the", "and",
    "with", "contains", "contain", "shows", "showing", "each", "only", "exactly", "more", "than", "fewer",
    "less", "same", "different", "small", "large", "big", "tiny", "background", "image", "images", "picture",
    "photo", "scene", "empty", "plain", "colored", "coloured", "color", "colour", "number", "count",
    "what", "which", "where", "how", "is", "are", "a", "an", "the", "of", "to", "it", "its", "s",
]


def corpus_sentences():
    """Sentences in the style of the synthetic datasets; every vocabulary below is trained or built from them."""
    sentences = list(PHRASES)
    for colour in COLOURS:
        for shape in SHAPES:
            sentences.append(f"a picture of a {colour} {shape}")
            sentences.append(f"what color is the {shape}? {colour}")
        for position in POSITIONS:
            sentences.append(f"a photo of a {colour} shape at the {position}")
    for number in NUMBERS:
        sentences.append(f"how many shapes are there? {number}")
        sentences.append(f"there are {number} {SHAPES[0]}s and {number} {SHAPES[1]}s")
    for position in POSITIONS:
        sentences.append(f"is there a shape at the {position}? yes")
        sentences.append(f"the {position} image contains a {SHAPES[2]}. no")
    for shape in SHAPES:  # the prompt style of BLIP-2's question answering
        sentences.append(f"Question: what color is the {shape}? Answer: {COLOURS[0]}")
        sentences.append(f"Question: is there a {shape}? Answer: yes")
    return sentences


def _corpus_words():
    words = []
    for sentence in corpus_sentences():
        for word in sentence.lower().replace("?", " ").replace(".", " ").split():
            for form in (word, word + "s"):
                if form not in words:
                    words.append(form)
    return words


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_vocabulary(vocab_size=None):
    """A WordPiece vocabulary: specials ([PAD] is id 0, as BERT configs assume), characters, ``##`` characters,
    then the corpus words; padded with ``[unusedN]`` tokens to exactly ``vocab_size`` when given."""
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = BERT_SPECIAL_TOKENS + characters + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += [word for word in _corpus_words() if word not in vocab]
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size: {vocab_size} is below the {len(vocab)} tokens the tiny vocabulary needs")
        vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    return vocab


def write_bert_tokenizer(directory, vocab_size=None):
    """Write an uncased ``BertTokenizer`` (``vocab.txt``, ``tokenizer_config.json``) to ``directory``; return it."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(bert_vocabulary(vocab_size)) + "\n")
    _write_json(os.path.join(directory, "tokenizer_config.json"),
                {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    return directory


OPT_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in facebook/opt-*


def write_opt_tokenizer(directory, vocab_size=1024):
    """Write a byte-level BPE ``GPT2Tokenizer`` configured like OPT's (``</s>`` is bos, eos and unk; a bos is
    prepended) to ``directory``; return it."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(corpus_sentences(), vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=OPT_SPECIAL_TOKENS)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_model(directory)
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False, "errors": "replace",
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "model_max_length": 512,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"),
                {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"})
    return directory


T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, as in t5 / flan-t5


def write_t5_tokenizer(directory, vocab_size=1024):
    """Write a cased ``T5TokenizerFast`` (``tokenizer.json``; ``</s>`` appended to each sequence) to ``directory``;
    return it.

    T5's own vocabulary is a sentencepiece Unigram; on a corpus this small a Unigram model splits common words into
    letters, so this one is a sentencepiece-style BPE (same ``▁`` word marker, same special tokens and ids).
    """
    from tokenizers import processors
    from tokenizers.implementations import SentencePieceBPETokenizer

    tokenizer = SentencePieceBPETokenizer(unk_token="<unk>")
    tokenizer.train_from_iterator(corpus_sentences(), vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=T5_SPECIAL_TOKENS,
                                  initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation))
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "model_max_length": 512,
    })
    _write_json(os.path.join(directory, "special_tokens_map.json"),
                {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    return directory


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
