"""Per-modality output schemas for enriched prompts: closed vocabularies, label logic, forbidden terms.

CRAFT appendix B.0.2 ("schema enforcement"): the MLLM answers in a fixed JSON schema whose
categorical fields take values from a closed set (skin type, body part, tissue context, optic-disc
findings ...), so the vocabulary stays standard across a dataset and malformed answers are caught.
Appendix B.0.1 ("label conditioning"): the true label is given, never predicted; here that becomes
(a) the answer must echo the given label, (b) label-dependent consistency rules on the categorical
fields (no_finding cannot have an opacity), (c) label-dependent forbidden terms anywhere in the
answer (no opacity/consolidation words for No Finding, no malignant vocabulary for benign classes).

A forbidden term is refused even when negated ("no opacity"): CLIP-style text encoders largely
ignore negation, so "no consolidation" conditions the generator towards consolidation.

>>> s = SCHEMAS["cxr"]
>>> ans = {"label": "no_finding", "view": "frontal", "cardiac_silhouette": "normal",
...        "lung_fields": "clear", "costophrenic_angles": "sharp", "opacity_location": "none",
...        "key_findings": ["sharp_hemidiaphragms"], "description": "Clear lungs, sharp angles."}
>>> validate_answer(ans, "cxr", "no_finding", ["no_finding", "pneumonia"]) is None
True
>>> validate_answer({**ans, "description": "No opacity seen."}, "cxr", "no_finding", ["no_finding"])
"forbidden term 'opacity' for label 'no_finding' in field 'description'"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_DESCRIPTION_WORDS = 40  # the enriched prompt feeds 64-77-token text encoders (SigLIP, CLIP): keep free text short
MAX_LIST_ITEMS = 4


@dataclass(frozen=True)
class Field:
    """One schema field: a closed set (``enum``), a list drawn from a closed set (``enum_list``) or free ``text``."""

    kind: str  # "enum" | "enum_list" | "text"
    values: tuple[str, ...] = ()
    doc: str = ""
    phrase: str = "{}"  # how a value reads in the enriched prompt


@dataclass(frozen=True)
class Schema:
    """What one modality's answer must look like and how it becomes prompt text."""

    modality: str
    prefix: str  # opening words of every enriched prompt ("H&E histopathology image of")
    fields: dict[str, Field]
    # label -> {field: allowed values}; a label-dependent rule (B.0.2 "label-dependent logic")
    label_rules: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def allowed(self, name: str, label: str | None = None, terms: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Values of field ``name`` a ``label`` may take: its label rule, minus values holding a forbidden term."""
        values = self.fields[name].values
        if label is not None:
            values = self.label_rules.get(norm_label(label), {}).get(name, values)
        return tuple(v for v in values if find_forbidden(v, terms) is None)

    def json_template(self, label: str | None = None, terms: tuple[str, ...] = ()) -> dict[str, str]:
        """A compact description of the schema for the instruction, offering only values ``label`` may use."""
        out = {"label": "<the given label, verbatim>"}
        for name, f in self.fields.items():
            if f.kind == "enum":
                out[name] = "one of: " + " | ".join(self.allowed(name, label, terms))
            elif f.kind == "enum_list":
                out[name] = f"list of 1-{MAX_LIST_ITEMS} of: " + " | ".join(self.allowed(name, label, terms))
            else:
                out[name] = f"{f.doc} (at most {MAX_DESCRIPTION_WORDS} words)"
        return out

    def json_schema(self, label: str, terms: tuple[str, ...] = ()) -> dict[str, Any]:
        """The JSON schema of an answer for ``label`` (sent as structured output), from ``allowed``.

        Every categorical field is an ``enum`` of the values ``label`` may take (label rule, minus values
        holding a forbidden term), lists hold 1-``MAX_LIST_ITEMS`` of them, ``label`` must echo the given
        label, and no other key is allowed. What a schema cannot say stays with ``validate_answer``:
        repeated list values, the description's word count and forbidden words in free text. Only the
        keywords OpenAI's strict mode accepts are used (every key required, additionalProperties false).
        """
        props: dict[str, Any] = {"label": {"type": "string", "enum": [label]}}
        for name, f in self.fields.items():
            if f.kind == "text":
                props[name] = {"type": "string", "description": f"{f.doc} (at most {MAX_DESCRIPTION_WORDS} words)"}
                continue
            values = list(self.allowed(name, label, terms))
            if not values:
                raise ValueError(f"{self.modality} field {name!r}: no value is allowed for label {label!r}")
            if f.kind == "enum":
                props[name] = {"type": "string", "enum": values}
            else:
                props[name] = {
                    "type": "array",
                    "items": {"type": "string", "enum": values},
                    "minItems": 1,
                    "maxItems": MAX_LIST_ITEMS,
                }
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _enum(*values: str, phrase: str = "{}") -> Field:
    return Field("enum", tuple(values), phrase=phrase)


def _enum_list(*values: str, phrase: str = "{}") -> Field:
    return Field("enum_list", tuple(values), phrase=phrase)


_DESCRIPTION = Field("text", doc="one or two plain sentences on what is visible in THIS image")

SCHEMAS: dict[str, Schema] = {
    # Histopathology (BreakHis breast tiles and the colon-like demo): tissue context and key findings
    # from a fixed morphology schema (B.0.2), patch-visible architecture and cytology only.
    "histo": Schema(
        modality="histo",
        prefix="H&E histopathology image of",
        fields={
            "tissue_context": _enum(
                "colonic_mucosa",
                "breast_parenchyma",
                "fibrous_stroma",
                "fibroepithelial_tissue",
                "mucin_pools",
                "glandular_epithelium",
            ),
            "architecture": _enum(
                "regular_crypts",
                "crowded_regular_glands",
                "tightly_packed_tubules",
                "compressed_slit_like_ducts",
                "leaf_like_stromal_fronds",
                "irregular_angulated_glands",
                "solid_nests_and_cords",
                "single_file_cords",
                "papillary_fronds",
                "cell_clusters_floating_in_mucin",
            ),
            "nuclei": _enum(
                "small_uniform_basal",
                "elongated_stratified",
                "enlarged_crowded",
                "pleomorphic_hyperchromatic",
                "small_discohesive",
                phrase="{} nuclei",
            ),
            "stroma": _enum("pink_collagenous", "cellular", "scant", "desmoplastic", "mucinous", phrase="{} stroma"),
            "stain_balance": _enum(
                "eosin_dominant", "balanced", "hematoxylin_dominant", "pale_basophilic_mucin", phrase="{} staining"
            ),
            "key_findings": _enum_list(
                "round_open_lumina",
                "goblet_cells",
                "smooth_gland_outlines",
                "nuclear_stratification",
                "dense_nuclear_clusters",
                "cribriform_glands",
                "jagged_gland_borders",
                "extracellular_mucin_lakes",
                "floating_epithelial_islands",
                "fibrovascular_cores",
                "clefted_spaces",
                "bland_cytology",
                "high_nuclear_density",
                "low_nuclear_density",
            ),
            "description": _DESCRIPTION,
        },
        label_rules={
            "normal": {
                "architecture": ("regular_crypts", "crowded_regular_glands"),
                "nuclei": ("small_uniform_basal",),
            },
            "adenoma": {"nuclei": ("elongated_stratified", "enlarged_crowded", "small_uniform_basal")},
            "mucinous_carcinoma": {"stroma": ("mucinous",)},
        },
    ),
    # Chest radiographs (CheXpert): categorical findings whose allowed values depend on the label.
    "cxr": Schema(
        modality="cxr",
        prefix="chest radiograph with",
        fields={
            "view": _enum("frontal", "lateral", phrase="{} view"),
            "cardiac_silhouette": _enum("normal", "enlarged", phrase="{} cardiac silhouette"),
            "lung_fields": _enum(
                "clear",
                "focal_opacity",
                "patchy_opacity",
                "basal_opacity",
                "diffuse_haziness",
                phrase="lung fields: {}",
            ),
            "costophrenic_angles": _enum(
                "sharp", "blunted_left", "blunted_right", "blunted_bilateral", phrase="{} costophrenic angles"
            ),
            "opacity_location": _enum(
                "none",
                "left_upper",
                "left_lower",
                "right_upper",
                "right_lower",
                "bilateral_lower",
                "perihilar",
                phrase="opacity at {}",
            ),
            "key_findings": _enum_list(
                "sharp_hemidiaphragms",
                "fine_vascular_markings",
                "widened_heart_shadow",
                "globular_heart_shape",
                "vascular_congestion",
                "meniscus_sign",
                "homogeneous_basal_opacity",
                "obscured_hemidiaphragm",
                "fluffy_ill_defined_opacity",
                "air_bronchograms",
                "asymmetric_lung_density",
            ),
            "description": _DESCRIPTION,
        },
        label_rules={
            "no_finding": {
                "cardiac_silhouette": ("normal",),
                "lung_fields": ("clear",),
                "costophrenic_angles": ("sharp",),
                "opacity_location": ("none",),
            },
            "cardiomegaly": {"cardiac_silhouette": ("enlarged",)},
            "pleural_effusion": {"costophrenic_angles": ("blunted_left", "blunted_right", "blunted_bilateral")},
            "pneumonia": {
                "lung_fields": ("focal_opacity", "patchy_opacity", "diffuse_haziness"),
                "opacity_location": (
                    "left_upper",
                    "left_lower",
                    "right_upper",
                    "right_lower",
                    "bilateral_lower",
                    "perihilar",
                ),
            },
        },
    ),
    # Dermatology (Fitzpatrick17k): body part and skin type from closed sets (B.0.2).
    "derm": Schema(
        modality="derm",
        prefix="clinical photograph of",
        fields={
            "body_part": _enum(
                "face",
                "scalp",
                "ear",
                "neck",
                "chest",
                "back",
                "abdomen",
                "arm",
                "hand",
                "leg",
                "foot",
                "genital",
                "nail",
                "mouth",
                "other",
                phrase="on the {}",
            ),  # fmt: skip
            "skin_type": _enum("fair", "light", "medium", "brown", "dark", phrase="{} skin"),
            "lesion_type": _enum(
                "macule",
                "patch",
                "papule",
                "plaque",
                "nodule",
                "vesicle",
                "pustule",
                "ulcer",
                "scar",
                "burrow",
            ),  # fmt: skip
            "border": _enum("well_defined", "ill_defined", "irregular", "raised_edge", phrase="{} border"),
            "colors": _enum_list(
                "red",
                "pink",
                "brown",
                "black",
                "blue",
                "white",
                "purple",
                "yellow",
                "skin_colored",
                "gray",
                phrase="colors: {}",
            ),  # fmt: skip
            "surface": _enum(
                "smooth", "scaly", "crusted", "ulcerated", "shiny", "rough", "weeping", "warty", phrase="{} surface"
            ),
            "description": _DESCRIPTION,
        },
    ),
    # Fundus (ORIGA): optic-disc findings from a fixed glaucoma-oriented schema (B.0.2).
    "fundus": Schema(
        modality="fundus",
        prefix="retinal fundus photograph with",
        fields={
            "cup_size": _enum("small", "moderate", "large", phrase="{} optic cup"),
            "cup_to_disc_ratio": _enum("low", "borderline", "high", phrase="{} cup-to-disc ratio"),
            "rim": _enum("intact", "focal_thinning", "diffuse_thinning", "notched", phrase="{} neuroretinal rim"),
            "vessels": _enum("normal_course", "nasalized", "bayoneting", phrase="vessels: {}"),
            "peripapillary": _enum(
                "unremarkable",
                "nerve_fiber_layer_defect",
                "disc_hemorrhage",
                "atrophy",
                phrase="{} peripapillary region",
            ),
            "description": _DESCRIPTION,
        },
        label_rules={
            "normal": {
                "rim": ("intact",),
                "cup_to_disc_ratio": ("low", "borderline"),
                "peripapillary": ("unremarkable",),
            },
            "glaucoma": {"cup_size": ("moderate", "large"), "cup_to_disc_ratio": ("borderline", "high")},
        },
    ),
    # Generic (modality ``other``): any collection without a modality of its own, medical or not. The closed
    # vocabulary names what any picture shows (kind of image, framing, colour, texture, structure), so the
    # enriched prompts keep one standard vocabulary (B.0.2) without claiming clinical findings; its class
    # checklists are generated by the MLLM backend (annotate.checklist=generate, craft/annotate/checklists.py).
    "other": Schema(
        modality="other",
        prefix="image of",
        fields={
            "image_kind": _enum(
                "photograph",
                "micrograph",
                "radiograph",
                "scan",
                "endoscopy",
                "illustration",
                "other",
                phrase="{}",
            ),  # fmt: skip
            "framing": _enum("close_up", "medium", "wide", "tile", phrase="{} view"),
            "dominant_colors": _enum_list(
                "red",
                "pink",
                "orange",
                "yellow",
                "green",
                "blue",
                "purple",
                "brown",
                "black",
                "white",
                "gray",
                phrase="colors: {}",
            ),  # fmt: skip
            "texture": _enum("smooth", "fine_grained", "coarse", "fibrous", "granular", "patchy", phrase="{} texture"),
            "structure": _enum(
                "single_object", "several_objects", "repeating_pattern", "layered", "diffuse", phrase="{}"
            ),
            "contrast": _enum("low", "medium", "high", phrase="{} contrast"),
            "description": _DESCRIPTION,
        },
    ),
}

# ----------------------------------------------------------------------------- forbidden terms
# Regex stems, matched case-insensitively at word starts over every string in the answer.
MALIGNANT_TERMS = (
    r"carcinom\w*",
    r"malignan\w*",
    r"invasi\w*",
    r"infiltrat\w*",
    r"atypi\w*",
    r"pleomorph\w*",
    r"metasta\w*",
    r"cancer\w*",
    r"desmoplas\w*",
    r"sarcom\w*",
    r"melanoma\w*",
    r"mitotic\s+figures?",
    r"high[\s_-]grade",
)
CXR_ABNORMAL_TERMS = (
    r"opaci\w*",
    r"opaque",
    r"consolidat\w*",
    r"effusion\w*",
    r"infiltrat\w*",
    r"blunt\w*",
    r"enlarg\w*",
    r"cardiomegal\w*",
    r"pneumon\w*",
    r"edema",
    r"oedema",
    r"atelecta\w*",
    r"meniscus",
    r"haz(?:e|y|iness)",
    r"air[\s_-]bronchogram\w*",
    r"congest\w*",
    r"mass(?:es)?",
    r"nodul\w*",
)
FUNDUS_GLAUCOMA_TERMS = (
    r"glaucom\w*",
    r"notch\w*",
    r"thinn\w*",
    r"nasaliz\w*",
    r"bayonet\w*",
    r"hemorrhag\w*",
    r"haemorrhag\w*",
    r"cupping",
    r"nerve[\s_-]fib(?:er|re)[\s_-]layer[\s_-]defect",
)
CXR_NORMAL_HEART_TERMS = (r"normal[\s_-](?:heart|cardiac)", r"heart[\s_-]size[\s_-](?:is[\s_-])?normal")

# Classes known to be benign (or normal). BreakHis: adenosis, fibroadenoma, phyllodes tumor, tubular
# adenoma are its benign group; the demo's normal and adenoma; Fitzpatrick17k's benign conditions.
BENIGN_HISTO = {"normal", "adenoma", "adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma", "benign"}
MALIGNANT_DERM = {"melanoma", "basal_cell_carcinoma", "squamous_cell_carcinoma", "mycosis_fungoides"}


def norm_label(label: str) -> str:
    """``"No Finding"`` -> ``"no_finding"``: the key used by schemas, rules and checklists."""
    return re.sub(r"[^a-z0-9]+", "_", str(label).strip().lower()).strip("_")


def forbidden_terms(modality: str, label: str, classes: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """Regex stems that may not appear anywhere in an answer for ``label`` (appendix B.0.2).

    Other classes' names are forbidden too (the model must not diagnose a different class),
    except generic ones such as "normal" that are ordinary words.

    >>> "opaci\\\\w*" in forbidden_terms("cxr", "No Finding")
    True
    >>> any(t.startswith("carcinom") for t in forbidden_terms("histo", "adenoma"))
    True
    >>> forbidden_terms("histo", "adenocarcinoma")
    ()
    """
    lab = norm_label(label)
    terms: list[str] = []
    if modality == "histo" and lab in BENIGN_HISTO:
        terms += MALIGNANT_TERMS
    if modality == "derm" and lab not in MALIGNANT_DERM:
        terms += MALIGNANT_TERMS
    if modality == "cxr" and lab == "no_finding":
        terms += CXR_ABNORMAL_TERMS
    if modality == "cxr" and lab == "cardiomegaly":
        terms += CXR_NORMAL_HEART_TERMS
    if modality == "fundus" and lab == "normal":
        terms += FUNDUS_GLAUCOMA_TERMS
    generic = {"normal", "no_finding", "benign", "other", "healthy"}
    for other in classes:
        o = norm_label(other)
        if o == lab or o in generic or o in lab:
            continue
        terms.append(r"[\s_-]".join(re.escape(w) for w in o.split("_")) + r"\w*")
    return tuple(dict.fromkeys(terms))


def _strings(obj: Any, path: str = ""):
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{path}[{i}]")


def find_forbidden(obj: Any, terms: tuple[str, ...]) -> tuple[str, str] | None:
    """The first (matched text, field path) of a forbidden term in any string of ``obj``, or None."""
    if not terms:
        return None
    pattern = re.compile(r"(?<![a-z0-9])(?:" + "|".join(terms) + r")", re.IGNORECASE)
    for path, text in _strings(obj):
        if path == "label":
            continue
        m = pattern.search(text.replace("_", " "))
        if m:
            return m.group(0).lower(), path
    return None


# ----------------------------------------------------------------------------- parsing and validation
def parse_json_answer(text: str) -> dict[str, Any]:
    """The JSON object in a model answer (bare, or inside a ```json fence). Raises ValueError with the reason."""
    s = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", s, re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    elif not s.startswith("{"):
        start, end = s.find("{"), s.rfind("}")
        if start < 0 or end <= start:
            raise ValueError(f"no JSON object in the answer: {text[:80]!r}")
        s = s[start : end + 1]
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at char {e.pos}): {s[:80]!r}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"the answer is JSON {type(obj).__name__}, not an object")
    return obj


def validate_answer(
    obj: dict[str, Any], modality: str, label: str, classes: list[str] | tuple[str, ...] = ()
) -> str | None:
    """None when ``obj`` satisfies ``modality``'s schema for the given ``label``, else the reason."""
    if modality not in SCHEMAS:
        return f"no schema for modality {modality!r} (known: {', '.join(sorted(SCHEMAS))})"
    schema = SCHEMAS[modality]
    expected = set(schema.fields) | {"label"}
    missing = sorted(expected - set(obj))
    if missing:
        return f"missing field {missing[0]!r}"
    extra = sorted(set(obj) - expected)
    if extra:
        return f"unexpected field {extra[0]!r}"
    if norm_label(str(obj["label"])) != norm_label(label):
        return f"label {obj['label']!r} does not echo the given label {label!r}"
    for name, f in schema.fields.items():
        v = obj[name]
        if f.kind == "enum":
            if not isinstance(v, str) or v not in f.values:
                return f"field {name!r}: {v!r} is not one of {', '.join(f.values)}"
        elif f.kind == "enum_list":
            if not isinstance(v, list) or not (1 <= len(v) <= MAX_LIST_ITEMS):
                return f"field {name!r}: expected a list of 1-{MAX_LIST_ITEMS} values, got {v!r}"
            bad = [x for x in v if not isinstance(x, str) or x not in f.values]
            if bad:
                return f"field {name!r}: {bad[0]!r} is not one of {', '.join(f.values)}"
            if len(set(v)) != len(v):
                return f"field {name!r}: repeated values {v!r}"
        else:
            if not isinstance(v, str) or not v.strip():
                return f"field {name!r}: expected non-empty text"
            n_words = len(v.split())
            if n_words > MAX_DESCRIPTION_WORDS:
                return f"field {name!r}: {n_words} words (at most {MAX_DESCRIPTION_WORDS})"
    for name, allowed in schema.label_rules.get(norm_label(label), {}).items():
        if obj[name] not in allowed:
            return f"field {name!r}: {obj[name]!r} contradicts label {label!r} (allowed: {', '.join(allowed)})"
    hit = find_forbidden(obj, forbidden_terms(modality, label, classes))
    if hit:
        return f"forbidden term {hit[0]!r} for label {norm_label(label)!r} in field {hit[1]!r}"
    return None


def _words(v: str) -> str:
    return v.replace("_", " ")


def enriched_prompt(obj: dict[str, Any], modality: str, label_phrase: str) -> str:
    """The enriched prompt p_i (CRAFT section 3.1) assembled from a validated answer.

    Categorical fields first (standard vocabulary), then the image-specific free text.
    """
    schema = SCHEMAS[modality]
    parts: list[str] = []
    for name, f in schema.fields.items():
        if f.kind == "text":
            continue
        v = obj[name]
        if f.kind == "enum_list":
            parts.append(f.phrase.format(", ".join(_words(x) for x in v)))
        elif v not in ("none", "other"):
            parts.append(f.phrase.format(_words(v)))
    text = f"{schema.prefix} {label_phrase}: " + "; ".join(parts) + ". " + obj["description"].strip()
    return re.sub(r"\s+", " ", text).strip()
