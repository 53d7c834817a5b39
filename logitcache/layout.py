"""The cache format, owned here: the typed manifest, its versions, and every array it implies.

    spec = Manifest.from_json(manifest_dict)      # format 1 migrates here, explicitly
    layout = Layout(spec)
    layout.target_sets()                          # ["ensemble", "members/a", ...]
    layout.arrays["ensemble/values"].shape        # (E, N, (T,) k)
    layout.target_path("ensemble", "stat")        # the only place a target array path is spelled

Format 1 (logitcache <= 0.1) stored ``topk`` targets only and had no ``codec`` entry; it migrates
to codec ``topk`` with its stored value and index dtypes. Format 2 adds ``codec``,
``codec_options`` and per target set provenance (``target_sets``). The JSON keys of format 1 are
all kept (the README documents them); readers that want a plain dict keep reading one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from logitcache import checks
from logitcache.codecs import TargetCodec, get_codec
from logitcache.errors import LogitCacheError
from logitcache.vocabulary import Vocabulary

FORMAT_VERSION = 2  # what this logitcache writes
READABLE_VERSIONS = (1, 2)
# One row per sample, not per view: stored in epoch 0's positions, written with its chunks.
SAMPLE_ARRAYS = ("content",)
PARAMS = "params/"  # prefix of the augmentation parameter arrays
STAGING = "staging/"  # prefix of target sets written to replace others (members.add_teachers)
# Written whole when the cache is created, so every chunk of them must be in storage.
LAYOUT_ARRAYS = ("ids/utf8", "ids/offsets")
# Written as the dump goes (absent: not done yet).
MARKER_ARRAYS = ("done",)
# The manifest's ``member_stats`` value when each member has a ``members/<name>/logit_moments``
# array [E, n_chunks, 3]: per chunk, the sums of the member's logits, of their squares, and of each
# row's (view's or frame's) logit sum squared over C (``MOMENTS``). Written with the chunk, before
# its done marker, so a resumed or distributed dump keeps them exact; absent in older caches.
MEMBER_STATS = "logit_moments"
MOMENTS = ("sum", "sum_sq", "row_sum_sq_over_c")

_DIGEST_KEYS = ("dataset", "classes", "augment", "teachers", "output_kind", "aggregation", "weights",
                "topk", "frames", "value_dtype", "seed", "chunk_rows")
_DIGEST_KEYS_IF_PRESENT = ("derived_arrays", "param_storage", "source", "positions", "vocabulary")
# Arrays a format-2 cache may derive instead of storing: both are pure functions of (seed, epoch,
# sample id) (augment.epoch_order, augment.view_seeds), pinned by tests/test_golden.py.
DERIVABLE = ("order", "seeds")


def config_digest(manifest: dict) -> str:
    """sha256 of everything that determines the cache's contents (not timings or paths). Format 2
    adds the codec and its options; a format-1 manifest's digest is computed as format 1 did."""
    keys = _DIGEST_KEYS + (("codec", "codec_options") if _version(manifest) >= 2 else ())
    # Later format-2 entries count only where present, so earlier format-2 caches keep their digest.
    keys += tuple(k for k in _DIGEST_KEYS_IF_PRESENT if k in manifest)
    doc = {k: manifest.get(k) for k in keys}
    doc["dataset"] = {k: v for k, v in (doc["dataset"] or {}).items() if k != "path"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _version(manifest: dict) -> int:
    v = manifest.get("format_version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) else 1


def class_names(manifest: dict):
    """A manifest's classes: its ``classes`` list, or the :class:`~logitcache.vocabulary.Vocabulary`
    its ``vocabulary`` entry describes (token caches, which do not list V names)."""
    if "vocabulary" in manifest:
        return Vocabulary.from_entry(manifest["vocabulary"], "manifest")
    return list(manifest["classes"])


def num_classes(manifest: dict) -> int:
    """C, the classes (or the vocabulary size V) of a manifest."""
    entry = manifest.get("vocabulary")
    if isinstance(entry, dict) and "vocab_size" in entry:
        return int(entry["vocab_size"])
    return len(manifest["classes"])


def unlisted(manifest: dict, name: str) -> bool:
    """Whether array ``name`` is one a manifest knowingly holds outside its layout: a target set
    of an unfinished ``add_teachers`` (its done marker too), or an array left for removal by an
    interrupted add or drop (``leftovers``; the next add or drop removes them). Readers never see them."""
    adding = manifest.get("adding") or {}
    return any(name == p or name.startswith(p + "/")
               for p in list(adding.get("target_sets") or {}) + list(manifest.get("leftovers") or []))


def target_sets(manifest: dict) -> list[str]:
    """Names of a cache's target sets: the ensemble's, then each stored member's."""
    return [Layout.target_set_of(None)] + [Layout.target_set_of(n) for n in manifest.get("members") or []]


def codec_entries(codec: str, value_dtype: str, index_dtype: str, value_bits: int | None = None,
                  sample_n: int | None = None, sample_head: int | None = None,
                  sample_temperature: float | None = None) -> dict:
    """The manifest entries that name a new cache's codec (format 2); ``value_bits`` as
    ``--value-bits``, ``sample_*`` as ``--sample-n/-head/-temperature`` (codec sampled only)."""
    options = get_codec(codec).default_options(value_dtype)
    given = [f"--sample-{o} {v}" for o, v in (("n", sample_n), ("head", sample_head),
                                               ("temperature", sample_temperature)) if v is not None]
    if codec == "sampled":
        from logitcache.codecs.sampled import codec_options

        options.update(codec_options(sample_n, sample_head, sample_temperature))
    elif given:
        raise LogitCacheError(f"{given[0]}: applies to --codec sampled only (this dump is --codec {codec})")
    if codec == "topk":
        options["index_dtype"] = index_dtype
    if value_bits is not None:
        if codec != "compact":
            raise LogitCacheError(f"--value-bits {value_bits}: applies to --codec compact only "
                                  f"(this dump is --codec {codec})")
        value_bits = checks.whole("--value-bits", value_bits)
        if value_bits > 16:
            raise LogitCacheError(f"--value-bits {value_bits}: must be between 1 and 16")
        options["value_bits"] = value_bits
    return {"codec": codec, "codec_options": options}


def _derived(m: dict) -> list[str]:
    names = m.get("derived_arrays") or []
    if not isinstance(names, list) or any(n not in DERIVABLE for n in names):
        raise LogitCacheError(f"manifest entry 'derived_arrays' is {names!r}; known: {', '.join(DERIVABLE)} "
                              f"(edited or damaged)")
    return list(names)


def _param_storage(m: dict) -> dict:
    out = m.get("param_storage") or {}
    for name, g in out.items() if isinstance(out, dict) else [(None, None)]:
        ok = isinstance(g, dict) and g.get("dtype") in _INT_DTYPES and all(
            isinstance(g.get(k), int) and not isinstance(g.get(k), bool) and g[k] > 0 for k in ("num", "den"))
        if not ok:
            raise LogitCacheError(f"manifest entry 'param_storage' of {name!r} is {g!r}, not "
                                  f"{{dtype, num, den}} (edited or damaged)")
    return dict(out)


_INT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64")


def new_manifest(*, dataset: dict, source: dict | None = None, classes: list[str], augmenter, teachers: list[dict],
                 members: list[str], output_kind: str, aggregation: str, weights: list[float] | None, topk: int,
                 frames: int | None, value_dtype: str, epochs: int, seed: int, chunk_rows: int, codec: dict, run: dict,
                 positions: list[int] | None = None) -> dict:
    """The manifest of a new cache (format 2): the one place one is built (dump, plan).

    ``source``: the data source's entry (``{"kind": ...}``, :meth:`logitcache.sources.Source.describe`;
    readers take a manifest without one as an ``audio_folder``); ``teachers``: each teacher's
    description (name, source, fingerprint); ``codec``: the entries
    of :func:`codec_entries`; ``run``: how the dump ran (precision, device, ...; not content).
    Order and seeds are derived, not stored; params drawn on an integer grid are stored as their
    integers (:meth:`Augmenter.param_grid`); ``content`` holds crc32s of the source files.
    ``positions``: ``[H', W']`` of dense-map teachers, whose ``frames = H' * W'`` positions are
    stored row-major (absent for clip and frame level)."""
    from logitcache.targets import index_dtype

    N = int(dataset["num_samples"])
    # a vocabulary is described (size and fingerprint), not listed: V names are 2.3 MB at V = 262,144
    listed = {"vocabulary": classes.describe()} if isinstance(classes, Vocabulary) else {"classes": list(classes)}
    m = {"dataset": dataset, **listed, "augment": augmenter.spec, "teachers": teachers,
         "members": list(members), "output_kind": output_kind, "aggregation": aggregation,
         "weights": list(map(float, weights)) if weights else None, "topk": int(topk), "frames": frames,
         "value_dtype": value_dtype, "index_dtype": index_dtype(len(classes)),
         "order_dtype": "uint32" if N < 2**32 else "uint64", "epochs": int(epochs), "seed": int(seed),
         "chunk_rows": int(chunk_rows), **run, "content": "crc32", "format_version": FORMAT_VERSION, **codec,
         "derived_arrays": list(DERIVABLE), "param_storage": augmenter.param_grid(),
         **({"member_stats": MEMBER_STATS} if members else {})}  # per-teacher logit statistics
    if source is not None:
        m["source"] = dict(source)
    if positions is not None:
        m["positions"] = [int(p) for p in positions]
    m["target_sets"] = _provenance(m, codec["codec"])
    return m


def _provenance(m: dict, codec: str) -> dict:
    """Per target set: the teachers it comes from (their fingerprints) and its codec; the writer
    adds when it was created. So a target set can be added to a cache later."""
    described = {d["name"]: d for d in m["teachers"]}
    sources = {Layout.target_set_of(None): list(described)}
    sources.update({Layout.target_set_of(n): [n] for n in m["members"]})
    return {ts: {"teachers": [{"name": n, "sha256": described[n].get("sha256")} for n in names], "codec": codec}
            for ts, names in sources.items()}


@dataclass
class Manifest:
    """A cache's manifest, typed. ``raw`` is the JSON document as stored (format 1 stays format 1
    on disk); the typed fields are read from it through the migration."""

    format_version: int  # 1 or 2
    codec: str  # the target codec of every target set ("topk" for format 1)
    codec_options: dict  # the codec's options (topk: value_dtype, index_dtype; compact: value_bits)
    epochs: int  # stored epochs E
    num_samples: int  # N, the dataset's samples
    num_classes: int  # C
    topk: int  # k
    frames: int | None  # T for frame-level targets (H' * W' for a dense map), else None
    chunk_rows: int  # rows per chunk along positions
    output_kind: str  # multilabel | multiclass
    members: list[str]  # teachers whose own top-k are stored besides the ensemble's
    value_dtype: str  # topk's stored value dtype (kept in every manifest: it is in the digest)
    index_dtype: str  # the dtype class ids decode to
    order_dtype: str  # dtype of ``order``
    content: bool  # the ``content`` array exists
    augment: dict  # the augmentation spec (params/* arrays follow from it)
    derived: list = field(default_factory=list)  # arrays recomputed on read, not stored (DERIVABLE)
    param_storage: dict = field(default_factory=dict)  # "op.param" -> {dtype, num, den}: stored as integers k
    target_sets: dict = field(default_factory=dict)  # name -> provenance (teachers, codec, written_at)
    member_stats: str | None = None  # MEMBER_STATS when members/<name>/logit_moments exist
    positions: tuple | None = None  # (H', W') when the frames are a dense map's positions, row-major
    vocabulary: dict | None = None  # token caches: {vocab_size, sha256[, tokenizer_sha256]} (classes not listed)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, m: dict) -> "Manifest":
        version = _version(m)
        if version not in READABLE_VERSIONS:
            raise LogitCacheError(f"cache format version {m.get('format_version')} is not supported "
                                  f"(this logitcache reads {', '.join(map(str, READABLE_VERSIONS))})")
        if version == 1:  # format 1: topk with the stored dtypes, no provenance
            codec, options = "topk", {"value_dtype": m["value_dtype"], "index_dtype": m["index_dtype"]}
        else:
            codec, options = m.get("codec"), m.get("codec_options") or {}
            if not isinstance(codec, str):
                raise LogitCacheError(f"manifest entry 'codec' is {codec!r}, not a codec name (edited or damaged)")
            get_codec(codec)
        return cls(format_version=version, codec=codec, codec_options=dict(options), epochs=int(m["epochs"]),
                   num_samples=int(m["dataset"]["num_samples"]), num_classes=num_classes(m),
                   topk=int(m["topk"]), frames=m.get("frames"), chunk_rows=int(m["chunk_rows"]),
                   output_kind=m["output_kind"], members=list(m.get("members") or []),
                   value_dtype=m.get("value_dtype", "float16"), index_dtype=m["index_dtype"],
                   order_dtype=m.get("order_dtype", "uint32"), content=bool(m.get("content")),
                   augment=m.get("augment") or {}, target_sets=dict(m.get("target_sets") or {}),
                   derived=_derived(m), param_storage=_param_storage(m), member_stats=m.get("member_stats"),
                   positions=tuple(m["positions"]) if m.get("positions") else None,
                   vocabulary=_vocabulary(m), raw=dict(m))

    def to_json(self) -> dict:
        """The JSON document: ``raw`` with the typed fields written back (format 2 entries only
        for a format-2 manifest)."""
        out = dict(self.raw)
        out.update(epochs=self.epochs, topk=self.topk, frames=self.frames, chunk_rows=self.chunk_rows,
                   output_kind=self.output_kind, members=list(self.members), value_dtype=self.value_dtype,
                   index_dtype=self.index_dtype, order_dtype=self.order_dtype)
        if self.format_version >= 2:
            out.update(format_version=self.format_version, codec=self.codec,
                       codec_options=dict(self.codec_options), target_sets=dict(self.target_sets))
        out.pop("positions", None)
        if self.positions:
            out["positions"] = list(self.positions)
        out.pop("member_stats", None)
        if self.member_stats:
            out["member_stats"] = self.member_stats
        return out

    def codec_instance(self) -> TargetCodec:
        return get_codec(self.codec)(self.topk, self.num_classes, self.output_kind, self.frames,
                                     self.codec_options)

    def stored_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the writer stores of a block of drawn rows: derived arrays dropped, params on a
        grid as their integers (checked: a value off its grid would not decode to itself)."""
        out = {}
        for name, v in rows.items():
            if name in self.derived:
                continue
            g = self.param_storage.get(name[len(PARAMS):]) if name.startswith(PARAMS) else None
            out[name] = v if g is None else _to_grid(name, v, g)
        return out

    def decoded_params(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stored param rows (keys with or without the ``params/`` prefix) back to the drawn float32."""
        out = {}
        for name, v in rows.items():
            g = self.param_storage.get(name[len(PARAMS):] if name.startswith(PARAMS) else name)
            out[name] = v if g is None else _from_grid(v, g)
        return out


@dataclass(frozen=True)
class ArraySpec:
    """One array of the layout. ``per``: "view" ([E, N, ...], chunked (1, R, ...)), "sample" ([N],
    chunked (R,)), "chunk" ([E, n_chunks, ...], one row per chunk, chunked (1, 1, ...)), "whole"
    (written at creation) or "marker" (done)."""

    name: str
    shape: tuple | None  # None: known only at creation (ids/utf8, the ids' UTF-8 bytes)
    dtype: str
    chunks: tuple | None
    per: str
    compress: bool = True
    target_set: str | None = None
    field: str | None = None

    @property
    def row_nbytes(self) -> int:
        """Bytes of one position's row (per-view and per-sample arrays)."""
        trailing = self.shape[2:] if self.per == "view" else self.shape[1:]
        return np.dtype(self.dtype).itemsize * int(np.prod(trailing, dtype=np.int64))


class Layout:
    """Every array a manifest implies: names, shapes, dtypes, chunks, compression. ``param_specs``
    (name -> (dtype, shape)) default to the manifest's augmentation spec's."""

    def __init__(self, spec: Manifest | dict, param_specs: dict | None = None):
        self.spec = spec if isinstance(spec, Manifest) else Manifest.from_json(spec)
        self.codec = self.spec.codec_instance()
        if param_specs is None:
            from logitcache.augment import Augmenter

            param_specs = Augmenter.from_spec(self.spec.augment).param_specs
        s = self.spec
        E, N, R = s.epochs, s.num_samples, s.chunk_rows
        a: dict[str, ArraySpec] = {
            "ids/utf8": ArraySpec("ids/utf8", None, "uint8", None, "whole"),
            "ids/offsets": ArraySpec("ids/offsets", (N + 1,), "int64", (min(N + 1, 1 << 20),), "whole"),
            "order": ArraySpec("order", (E, N), s.order_dtype, (1, R), "view"),
            # random bits: incompressible
            "seeds": ArraySpec("seeds", (E, N), "uint64", (1, R), "view", compress=False),
        }
        for name in s.derived:
            del a[name]
        for name, (dtype, shape) in param_specs.items():
            path = self.param_path(name)
            dtype = s.param_storage.get(name, {}).get("dtype", dtype)
            a[path] = ArraySpec(path, (E, N, *shape), dtype, (1, R, *shape), "view")
        for ts in self.target_sets():
            for f, (dtype, trailing) in self.codec.fields().items():
                path = self.target_path(ts, f)
                a[path] = ArraySpec(path, (E, N, *trailing), dtype, (1, R, *trailing), "view",
                                    target_set=ts, field=f)
        if s.content:  # crc32s: incompressible
            a["content"] = ArraySpec("content", (N,), "uint32", (R,), "sample", compress=False)
        if s.member_stats == MEMBER_STATS:
            for m in s.members:
                path = self.stats_path(m)
                a[path] = ArraySpec(path, (E, -(-N // R), len(MOMENTS)), "float64", (1, 1, len(MOMENTS)), "chunk",
                                    compress=False)
        a["done"] = ArraySpec("done", (E, -(-N // R)), "uint8", (1, 1), "marker", compress=False)
        self.arrays = a

    def target_sets(self) -> list[str]:
        return target_sets({"members": self.spec.members})

    @staticmethod
    def target_set_of(member: str | None) -> str:
        return "ensemble" if member is None else f"members/{member}"

    @staticmethod
    def target_path(target_set: str, field: str) -> str:
        return f"{target_set}/{field}"

    @staticmethod
    def param_path(name: str) -> str:
        return f"{PARAMS}{name}"

    @staticmethod
    def target_done_path(target_set: str) -> str:
        """The done marker [E, n_chunks] of one target set being added to a finished cache
        (``members.add_teachers``); it exists only until the addition is committed."""
        return f"{target_set}/done"

    @staticmethod
    def staged(target_set: str) -> str:
        """Where a target set's replacement is written before it is swapped in (a recomputed ensemble)."""
        return f"{STAGING}{target_set}"
    @classmethod
    def stats_path(cls, member: str) -> str:
        """A member's per-chunk logit sums (see ``MEMBER_STATS``)."""
        return cls.target_path(cls.target_set_of(member), MEMBER_STATS)

    def per_chunk(self) -> dict[str, ArraySpec]:
        """Arrays with one row per (epoch, chunk), written with the chunk (member statistics)."""
        return {n: x for n, x in self.arrays.items() if x.per == "chunk"}

    def target_arrays(self, target_set: str) -> dict[str, ArraySpec]:
        """field -> spec of one target set's arrays (its codec's; not a member's ``logit_moments``)."""
        return {x.field: x for x in self.arrays.values() if x.target_set == target_set}

    def fields(self) -> list[str]:
        return list(self.codec.fields())

    def per_position(self) -> dict[str, ArraySpec]:
        """Arrays with one row per stored position (per view, and per sample)."""
        return {n: x for n, x in self.arrays.items() if x.per in ("view", "sample")}

    def row_nbytes(self, name: str) -> int | None:
        """Bytes per row of a target array, from the manifest alone (None for other arrays)."""
        x = self.arrays.get(name)
        return x.row_nbytes if x is not None and x.target_set else None

    def target_row_bytes(self) -> int:
        """Bytes per view of one target set, uncompressed."""
        return self.codec.row_bytes()

    def raw_bytes(self, id_bytes: int) -> dict[str, int]:
        """Uncompressed bytes of every array (``id_bytes``: the ids' UTF-8 length)."""
        out = {}
        for n, x in self.arrays.items():
            shape = (id_bytes,) if x.shape is None else x.shape
            out[n] = int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        return out


def _vocabulary(m: dict) -> dict | None:
    """The ``vocabulary`` entry of a token cache. Token caches written before it listed the V id
    names in ``classes``; they migrate to the entry of an id-only vocabulary of that size (their
    file stays as written)."""
    if "vocabulary" in m:
        return Vocabulary.from_entry(m["vocabulary"]).describe()
    if (m.get("augment") or {}).get("modality") != "tokens":
        return None
    names = m["classes"]
    if Vocabulary(len(names)) != names:
        raise LogitCacheError(f"manifest entry 'classes' of a token cache is not the {len(names)} token ids "
                              f"\"0\" .. \"{len(names) - 1}\" (edited or damaged)")
    return Vocabulary(len(names)).describe()


def _from_grid(k: np.ndarray, g: dict) -> np.ndarray:
    # (k * num) / den in float64 is how the op computed the value before its float32 cast
    return ((np.asarray(k).astype(np.float64) * g["num"]) / g["den"]).astype(np.float32)


def _to_grid(name: str, v: np.ndarray, g: dict) -> np.ndarray:
    k = np.rint(np.asarray(v, np.float64) * g["den"] / g["num"])
    info = np.iinfo(g["dtype"])
    bad = ~np.isfinite(k) | (k < info.min) | (k > info.max)
    if not bad.any():
        k = k.astype(g["dtype"])
        bad = _from_grid(k, g).view(np.uint32) != np.asarray(v, np.float32).view(np.uint32)
    if bad.any():  # a bug in an op's draw or grid, never silently rounded
        x = np.asarray(v).reshape(-1)[int(np.flatnonzero(bad.reshape(-1))[0])]
        raise LogitCacheError(f"{name}: drawn value {x!r} is not on its stored grid "
                              f"(k * {g['num']} / {g['den']} as {g['dtype']})")
    return k
