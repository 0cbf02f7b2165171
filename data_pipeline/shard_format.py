"""What a shard directory holds on disk: the names and constants shared by the writer, the checks and the readers.

    <dir>/manifest.json     written last: format, version, num_samples, seq_len, dtype, tokenizer_fingerprint,
                            "shards" (file, num_samples per shard, in order) and "files" (name, bytes, sha256 of
                            every file in the directory)
    MDS:         index.json + shard.NNNNN.mds   (mosaicml-streaming's MDSWriter; one column "tokens",
                                                 encoding "ndarray:uint32:<seq_len>")
    webdataset:  shard-NNNNNN.tar               (one "NNNNNNNNN.tokens.npy" member per sample)

`documents` packing writes per-position document ids as a second shard directory `<split>_documents/` beside
`<split>/`, with the same layout.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("mds", "webdataset")
DTYPE = "uint32"
"""Every token (and document id) is stored as uint32."""
MDS_COLUMN = "tokens"
WDS_MEMBER_EXT = "tokens.npy"

PADDING_DOCUMENT_ID = 2**32 - 1
"""Document id of padding positions. A fixed sentinel rather than "the next id": padding is EOS, and a document's
last chunk can be a lone EOS too, so only the id tells a reader which positions to leave out of the loss."""
DOCUMENT_IDS_SUFFIX = "_documents"
"""`<split>_documents/` beside `<split>/` holds per-position document ids of `documents` packing (preprocess.py)."""
