"""Language codes: BCP-47 tags ("en", "pt-BR", "fil") or English names ("Hindi") to one normal form.

Used wherever a config or a data file names a language (evaluation and synthesis prompt sets, the lexicon
judge's coverage, per-language metrics), so that "Hindi", "hi" and "hi_IN" agree.
"""

from __future__ import annotations

import re

_ISO_639_1 = set(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz "
    "ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik "
    "io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml "
    "mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd "
    "se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi "
    "vo wa wo xh yi yo za zh zu".split()
)
_ISO_639_3_EXTRA = {"fil", "ceb", "yue", "cmn", "arq", "kab", "haw", "hil", "ilo", "nso", "sco", "tet"}
LANGUAGE_NAMES = {
    "arabic": "ar", "bengali": "bn", "chinese": "zh", "czech": "cs", "dutch": "nl", "english": "en",
    "filipino": "fil", "french": "fr", "german": "de", "greek": "el", "hebrew": "he", "hindi": "hi",
    "indonesian": "id", "italian": "it", "japanese": "ja", "korean": "ko", "persian": "fa", "polish": "pl",
    "portuguese": "pt", "romanian": "ro", "russian": "ru", "serbian": "sr", "spanish": "es", "swahili": "sw",
    "tagalog": "fil", "telugu": "te", "thai": "th", "turkish": "tr", "ukrainian": "uk", "vietnamese": "vi",
}  # fmt: skip
_LANG_TAG = re.compile(r"^([a-zA-Z]{2,3})(?:[-_][a-zA-Z0-9]{2,8})*$")


def normalise_language(value: object, where: str = "language") -> str:
    """A BCP-47 code ("pt-BR" stays "pt-BR") or an English name ("Hindi" -> "hi"); ValueError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a language code such as 'en', got {value!r}")
    text = value.strip()
    if text.lower() in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[text.lower()]
    m = _LANG_TAG.match(text)
    primary = m.group(1).lower() if m else ""
    if primary not in _ISO_639_1 and primary not in _ISO_639_3_EXTRA:
        raise ValueError(
            f"{where}: unknown language code {value!r}; use a BCP-47 code (ISO 639-1 such as 'en', 'zh', "
            f"'es') or an English name such as 'Hindi'"
        )
    return primary + text[len(primary) :].replace("_", "-")
