"""The offline byte-level tokenizer: ids are UTF-8 bytes, text round-trips, the folder reloads with its chat
template; the built-in templates render the hand-written formats."""

from __future__ import annotations

import pytest
import transformers

from enchtable_jax.models.tokenizer import BYTE_VOCAB_SIZE, CHATML_TEMPLATE, TEMPLATES, byte_level_tokenizer

TEXTS = ["hello world", "héllo wörld", "日本語のテキスト", "emoji 🎉🧪 and ZWJ 👩‍🔬",
         "  leading and trailing  ",
         "tabs\tnew\nlines\r\nnul\x00 del\x7f", "ÿ¡¬®\u0100", "", "literal <|im_end|> inside"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def reloaded(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    tokenizer.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_vocabulary_layout(tokenizer):
    assert BYTE_VOCAB_SIZE == len(tokenizer) == 259
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [256, 257, 258]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 256
    assert set(tokenizer.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_ids_are_utf8_bytes(tokenizer, text):
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))


def test_every_byte_value_is_its_own_token(tokenizer):
    for byte in range(256):
        assert tokenizer.convert_ids_to_tokens(byte) is not None
    assert tokenizer.decode(list("añb".encode("utf-8"))) == "añb"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, reloaded, text):
    for tok in (tokenizer, reloaded):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_in_text_are_single_ids(tokenizer):
    assert tokenizer.encode("a<|im_start|>b<|im_end|>", add_special_tokens=False) == [97, 257, 98, 258]


def test_reload_keeps_everything(tokenizer, reloaded):
    assert reloaded.chat_template == CHATML_TEMPLATE
    assert len(reloaded) == BYTE_VOCAB_SIZE
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    for text in TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.apply_chat_template(CHAT, return_dict=False)
    assert reloaded.apply_chat_template(CHAT, return_dict=False) == ids


def test_chatml_rendering(reloaded):
    text = reloaded.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    full = reloaded.apply_chat_template(CHAT, tokenize=False)
    assert full == text + "Hello.<|im_end|>\n"
    ids = reloaded.apply_chat_template(CHAT, return_dict=False)
    assert ids[0] == 257 and ids.count(258) == 3 and reloaded.decode(ids) == full


def test_tokenizer_without_template(tmp_path):
    byte_level_tokenizer(chat_template=None).save_pretrained(tmp_path)
    assert not transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template


def test_custom_template_survives_reload(tmp_path):
    byte_level_tokenizer(TEMPLATES["plain"]).save_pretrained(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == TEMPLATES["plain"]


@pytest.mark.parametrize("name,prompt,response", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
     "Hello.<|im_end|>\n"),
    ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
     "Hello.<|eot_id|>"),
    ("plain", "Be brief.\n\n### Instruction:\nHi?\n\n### Response:\n", "Hello.<|endoftext|>\n\n"),
])
def test_builtin_templates(tokenizer, name, prompt, response):
    render = dict(chat_template=TEMPLATES[name], tokenize=False)
    assert tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, **render) == prompt
    assert tokenizer.apply_chat_template(CHAT, **render) == prompt + response
    assert set(TEMPLATES) == {"chatml", "llama3", "plain"}


def test_llama3_template_uses_bos_when_the_tokenizer_has_one(tokenizer):
    text = tokenizer.apply_chat_template(CHAT[1:], chat_template=TEMPLATES["llama3"], tokenize=False,
                                         bos_token="<|begin_of_text|>")
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")
