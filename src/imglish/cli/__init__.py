

def parse_key_values(items: list[str], flag: str) -> dict[str, object]:
    """``["a.b=1", "c=x"]`` from a repeatable ``flag KEY=VALUE`` option as ``{"a.b": 1, "c": "x"}`` (JSON values
    decoded, anything else kept as a string).

    Raises:
        ValueError: an item without ``=`` or with an empty key, naming the flag.
    """
    import json

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out
