"""An offline byte-level tokenizer and built-in chat templates.

`byte_level_tokenizer()` builds, with the `tokenizers` library and no downloads, a tokenizer whose ids
0..255 are the 256 bytes and 256..258 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`: every string
round-trips, so random tiny models and tests get a real `transformers` tokenizer with a chat template.
`TEMPLATES` holds the chat templates used when a model folder brings none.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import check_inside, check_tree, contained, read_json

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML: every turn is `<|im_start|>ROLE\nCONTENT<|im_end|>\n`; the generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3 headers; the markers are plain text here and become special tokens with a Llama 3 tokenizer.
# Unlike Meta's template, contents are not trimmed, so the targets are exactly the data's responses.
LLAMA3_TEMPLATE = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Alpaca-style prompt for base models; a response ends with the tokenizer's eos token.
PLAIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else %}{{- '### Response:\\n' + message['content'] + (eos_token if eos_token else '') + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "plain": PLAIN_TEMPLATE}


def _byte_symbols() -> list[str]:
    """The printable character that byte-level BPE (GPT-2 convention, as `tokenizers`' ByteLevel) uses for each byte.

    Printable Latin-1 bytes stand for themselves; the others map, in byte order, to U+0100 onwards.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_level_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer (id = byte value, no merges) plus ChatML special tokens, built offline.

    `<|endoftext|>` is eos and pad. `save_pretrained` writes a folder that `AutoTokenizer` reloads, chat
    template included (`chat_template=None` gives a tokenizer without one).
    """
    symbols = _byte_symbols()
    if set(symbols) != set(pre_tokenizers.ByteLevel.alphabet()):  # guards the convention above
        raise RuntimeError("byte symbols disagree with tokenizers' ByteLevel alphabet; the tokenizers library changed")
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]), chat_template=chat_template,
        clean_up_tokenization_spaces=False)


class TokenizerError(EnchtableError):
    """A tokenizer folder that cannot be read safely: not local, asking for its own code, or naming outside files."""


# JSON files of a tokenizer folder that transformers reads and that can ask for the folder's own Python code.
_CODE_CONFIGS = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def check_tokenizer_folder(folder: str | Path) -> Path:
    """Refuse a tokenizer folder that is not a local folder, or whose files ask for code or point outside it.

    Checked before transformers reads anything, so no prompt about remote code can appear: `auto_map` in a
    config refused; every `*_file` entry of tokenizer_config.json and every file of the folder must resolve
    inside it (after symlinks). Returns the folder's resolved path.
    """
    given = folder
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TokenizerError(f"{given}: not a local folder; tokenizers are only read from a folder on disk (nothing "
                             "is downloaded): pass the folder that holds tokenizer.json / tokenizer_config.json")
    folder = folder.resolve()
    for entry in sorted(folder.iterdir()):
        if entry.is_file() or entry.is_symlink():
            check_inside(folder, entry)
    templates = folder / "additional_chat_templates"
    if templates.is_dir():
        check_inside(folder, templates)
        check_tree(templates)
    for name in _CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        config = read_json(path, expect=None)
        if not isinstance(config, dict):
            raise TokenizerError(f"{path}: must hold a JSON object, got {type(config).__name__}")
        if "auto_map" in config:
            raise TokenizerError(f"{path}: field auto_map asks to run Python code shipped with the folder; refused "
                                 "(enchtable never runs a model's own code). Use a folder whose tokenizer transformers "
                                 "supports natively")
        if name == "tokenizer_config.json":
            for key, value in config.items():
                if key.endswith("_file") and isinstance(value, str):
                    contained(folder, value, path, key)
    return folder


def load_tokenizer(folder: str | Path | None, purpose: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved in a local model folder, read offline by `AutoTokenizer` without running any code.

    Errors say what needed it. No hub access (`local_files_only`), no remote code (`trust_remote_code=False`,
    and a folder that asks for it is refused before transformers is called, so nothing ever prompts).
    """
    if folder is None:
        raise FileNotFoundError(f"the model was not loaded from a folder, so it has no tokenizer; {purpose}: pass a "
                                "tokenizer or a folder holding one")
    resolved = check_tokenizer_folder(folder)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(resolved), trust_remote_code=False,
                                                          local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: no usable tokenizer files ({e}); {purpose}") from e
    except Exception as e:  # noqa: BLE001 - transformers fails on wrongly typed files as TypeError, AttributeError...
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise TokenizerError(f"{folder}: the tokenizer files could not be loaded ({detail}); {purpose}") from e
