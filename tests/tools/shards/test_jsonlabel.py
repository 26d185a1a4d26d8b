"""The label field's digits found in raw JSON bytes: where a label pointer ends."""

from __future__ import annotations

import json
import random

from moco_dali.tools.shards.jsonlabel import find_label

TRICKY = ['"label": 5', "label", "{[}]", 'a \\"label\\": 7', "\\", "é \u2028", ",", ":"]


def _value(rng: random.Random, depth: int):
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(TRICKY) + str(rng.randrange(100))
    if kind == 1:
        return rng.choice([rng.randrange(10**6), -3, 2.5, True, None])
    if kind == 2:
        return "label"
    if kind == 3:
        return ""
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int) -> dict:
    keys = rng.sample(["label", "caption", "meta", "label2", "x", "key"], rng.randrange(5))
    return {k: _value(rng, depth) for k in keys}


def test_the_pointer_ends_at_the_top_level_fields_digits_whatever_surrounds_them():
    """Random documents, with the field's name and digits in strings, nested objects and lists
    before and after it, written compact, spaced and indented: replacing the bytes the finder
    names by another number changes the top-level field and nothing else."""
    rng = random.Random(7)
    for trial in range(300):
        document = _object(rng, 0)
        document.pop("label", None)
        items = list(document.items())
        items.insert(rng.randrange(len(items) + 1), ("LABEL", rng.randrange(1 << 20)))
        spacing = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}])
        raw = json.dumps(dict(items), ensure_ascii=rng.random() < 0.5, **spacing).encode()
        # The field's own name, plain or with an escape (as JSON allows), once: "LABEL" is in no
        # other key nor value.
        raw = raw.replace(b'"LABEL"', rng.choice([b'"label"', b'"la\\u0062el"']))
        document = {k if k != "LABEL" else "label": v for k, v in items}
        found = find_label(raw, ["label"], 1 << 20)
        assert found.reason is None and found.value == document["label"], (trial, raw)
        digits = str(document["label"]).encode()
        start = found.end - len(digits)
        assert raw[start : found.end] == digits, (trial, raw)
        changed = json.loads(raw[:start] + b"1234567" + raw[found.end :])
        assert changed == {**document, "label": 1234567}, (trial, raw)
