"""Built-in families, one file each: how to read the checkpoint's config.json, and what the
family is made of. A VLM is a composed model (mmjax.models.composed) plus its processor and
prepare step; its converter rules live in converters/families/ (same file name)."""
