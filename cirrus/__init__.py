"""cirrus: end-to-end ML workflows on zipcomm (under construction)."""

__all__: list[str] = []
