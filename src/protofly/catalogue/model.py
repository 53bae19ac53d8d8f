"""The protocol stub descriptor and source package, as reTHINK publishes them.

Parsing is tolerant where real reTHINK artefacts disagree with each other (both catalogue layouts,
``version`` as a number, ``[]`` where an object is meant, a JSON string for ``configuration``, base64 or
plain source, leading whitespace, fields outside the model) and strict about what the runtime relies on
(``objectName``, ``language``, ``configuration``, ``constraints``, ``interworking``, the source package,
``sandbox``, ``signature``).  Every rejection is a :class:`DescriptorError` naming the field, and nothing
is dropped: unknown fields stay in ``extra`` and the original object in ``raw``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from packaging.requirements import InvalidRequirement, Requirement

from protofly.catalogue.errors import E_TOO_LARGE, CatalogueError, DescriptorError
from protofly.sandbox.limits import LimitError, SandboxLimits

__all__ = [
    "DEFAULT_MAX_DESCRIPTOR_SIZE",
    "KNOWN_FIELDS",
    "ProtocolStubDescriptor",
    "SandboxLimits",
    "SourcePackage",
    "compare_versions",
    "decode_json",
    "parse_descriptor",
    "parse_source_package",
    "sha256_hex",
]

#: Largest descriptor (with an embedded, possibly base64, source) accepted from a file or the network.
DEFAULT_MAX_DESCRIPTOR_SIZE = 8 << 20

#: Descriptor fields this model interprets; everything else is kept in ``extra``.
#: More requirements than this in one descriptor is refused (a descriptor is not a lock file).
MAX_REQUIREMENTS = 32

KNOWN_FIELDS = frozenset(
    {
        "cguid",
        "type",
        "version",
        "objectName",
        "description",
        "language",
        "sourcePackageURL",
        "sourcePackage",
        "signature",
        "messageSchemas",
        "messageSchema",
        "configuration",
        "constraints",
        "hypertyType",
        "dataObjects",
        "interworking",
        "Interworking",
        "idpProxy",
        "mutualAuthentication",
        "sandbox",
        "requirements",
        "publisher",
    }
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
_CLASSNAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.\-]{0,127}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_DOMAIN = re.compile(r"(?!-)[a-z0-9_\-]{1,63}(?<!-)(\.(?!-)[a-z0-9_\-]{1,63}(?<!-))*\Z")
_BOM = b"\xef\xbb\xbf"
#: Integers from here on are refused where they would be printed (Python refuses to print 4,300 digits).
_HUGE = 10**64
_VERSION_PART = re.compile(r"\d+|[^\d.\-+_]+")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class SourcePackage:
    """A reTHINK source package: the code (``sourceCode``, as on the wire) and how to read it."""

    classname: str | None
    source_code: str | None
    encoding: str | None
    sha256: str | None
    md5: str | None
    raw: dict[str, Any]

    @property
    def embedded(self) -> bool:
        return self.source_code is not None

    def decode(self) -> tuple[bytes, str | None]:
        """The source bytes and, when the declared encoding had to be overridden, a warning saying so.

        reTHINK decodes only when ``encoding`` is ``base64`` and otherwise uses the text as is; some of its
        packages say ``base64`` over plain text.  When ``sha256`` is known it decides between the two
        readings; otherwise plain text is the fallback when base64 decoding fails.
        """
        if self.source_code is None:
            raise DescriptorError("sourcePackage.sourceCode", "no source code in this package")
        plain = self.source_code.encode("utf-8")
        if _norm(self.encoding) != "base64":
            return plain, None
        decoded = _b64(self.source_code)
        if self.sha256 is not None:
            if decoded is not None and sha256_hex(decoded) == self.sha256:
                return decoded, None
            if sha256_hex(plain) == self.sha256:
                return plain, "sourcePackage.encoding says base64 but the source is plain text"
            return (decoded if decoded is not None else plain), None
        if decoded is None:
            return plain, "sourcePackage.encoding says base64 but the source is not base64; used as plain text"
        return decoded, None


@dataclass(frozen=True, slots=True)
class ProtocolStubDescriptor:
    """A protocol stub descriptor as reTHINK catalogues serve it (`docs/catalogue.md`), normalised.

    ``version`` is always a string (``""`` when the descriptor has none, as in reTHINK's static files);
    ``configuration`` and ``constraints`` are always dicts; ``extra`` holds the fields outside the model
    and ``raw`` the object as received.
    """

    object_name: str
    version: str
    language: str
    description: str
    configuration: dict[str, Any]
    constraints: dict[str, Any]
    interworking: bool
    idp_proxy: bool
    cguid: str | None
    source_package_url: str | None
    source_package: SourcePackage | None
    signature: str | None
    sandbox_limits: SandboxLimits | None
    #: Python packages the stub imports beyond the SDK (PEP 508, e.g. ``"slixmpp>=1.8"``); checked against
    #: the sandbox's environment before the stub runs.
    requirements: tuple[str, ...]
    publisher: str | None
    message_schemas: Any
    data_objects: Any
    hyperty_type: Any
    mutual_authentication: Any
    extra: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def source_classname(self) -> str | None:
        """``sourcePackage.sourceCodeClassname``: the class to load, or None for a module ``activate()``."""
        return self.source_package.classname if self.source_package else None

    @property
    def source_sha256(self) -> str | None:
        return self.source_package.sha256 if self.source_package else None

    @property
    def language_key(self) -> str:
        """``language`` folded for comparison: ``"Javascript ECMA6"`` → ``javascript_ecma6``."""
        return re.sub(r"[\s\-]+", "_", self.language.strip().lower())

    @property
    def is_python(self) -> bool:
        return self.language_key in ("python", "python3")

    def summary(self) -> dict[str, Any]:
        """What ``protofly catalogue check`` prints."""
        package = self.source_package
        return {
            "objectName": self.object_name,
            "version": self.version or None,
            "language": self.language,
            "interworking": self.interworking,
            "configuration": sorted(self.configuration),
            "constraints": self.constraints,
            "sandbox": self.sandbox_limits.as_wire() if self.sandbox_limits else None,
            "requirements": list(self.requirements),
            "sourceCodeClassname": self.source_classname,
            "sourceEmbedded": bool(package and package.embedded),
            "sourcePackageURL": self.source_package_url,
            "sha256": self.source_sha256,
            "signed": self.signature is not None,
            "publisher": self.publisher,
            "unknownFields": sorted(self.extra),
        }


# -- parsing -------------------------------------------------------------------------------------------


def decode_json(data: bytes | str, *, what: str, url: str | None = None, max_size: int) -> Any:
    """JSON text → Python objects, with the size limit and a message that says where it broke."""
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else data
    except UnicodeEncodeError as exc:
        raise DescriptorError("", f"{what} text holds a lone surrogate at character {exc.start}", url=url) from None
    if len(raw) > max_size:
        raise CatalogueError(E_TOO_LARGE, f"{what} of {len(raw)} bytes is over the {max_size}-byte limit", url=url)
    raw = raw.removeprefix(_BOM)
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:  # out-of-range numbers included
        raise DescriptorError("", f"{what} is not valid JSON: {exc}", url=url) from None
    except RecursionError:
        raise DescriptorError("", f"{what} is not valid JSON: nested too deeply", url=url) from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise DescriptorError("", f"{what} is not valid UTF-8 (byte 0x{byte:02x} in a string)", url=url) from None


def parse_descriptor(
    data: Any,
    *,
    url: str | None = None,
    max_size: int = DEFAULT_MAX_DESCRIPTOR_SIZE,
) -> ProtocolStubDescriptor:
    """Parse and validate a protocol stub descriptor: JSON text (bytes/str) or an already decoded value."""
    obj = decode_json(data, what="descriptor", url=url, max_size=max_size) if isinstance(data, bytes | str) else data
    if not isinstance(obj, dict):
        raise DescriptorError("", f"a descriptor must be a JSON object, got {_type(obj)}", url=url)
    try:
        return _build(obj)
    except DescriptorError as exc:
        if url and exc.url is None:
            raise DescriptorError(exc.field, _problem(exc), url=url) from None
        raise


def parse_source_package(
    data: Any,
    *,
    url: str | None = None,
    max_size: int = DEFAULT_MAX_DESCRIPTOR_SIZE,
) -> SourcePackage:
    """Parse a source package served on its own (``/.well-known/sourcepackage/<class>``)."""
    obj = (
        decode_json(data, what="source package", url=url, max_size=max_size) if isinstance(data, bytes | str) else data
    )
    try:
        package = _package(obj, "sourcePackage")
    except DescriptorError as exc:
        raise DescriptorError(exc.field, _problem(exc), url=url) from None
    if package is None:
        raise DescriptorError("sourcePackage", "empty source package", url=url)
    return package


def _problem(exc: DescriptorError) -> str:
    return exc.message.removeprefix(f"{exc.field}: ") if exc.field else exc.message


def _build(obj: dict[str, Any]) -> ProtocolStubDescriptor:
    interworking_key = "interworking" if "interworking" in obj else "Interworking"
    schemas_key = "messageSchemas" if "messageSchemas" in obj else "messageSchema"
    return ProtocolStubDescriptor(
        object_name=_object_name(obj.get("objectName")),
        version=_version(obj.get("version")),
        language=_required_text(obj, "language"),
        description=_optional_text(obj, "description") or "",
        configuration=_object(obj.get("configuration"), "configuration"),
        constraints=_object(obj.get("constraints"), "constraints"),
        interworking=_flag(obj.get(interworking_key), interworking_key),
        idp_proxy=_flag(obj.get("idpProxy"), "idpProxy"),
        cguid=_cguid(obj.get("cguid")),
        source_package_url=_optional_text(obj, "sourcePackageURL") or None,
        source_package=_package(obj.get("sourcePackage"), "sourcePackage"),
        signature=_optional_text(obj, "signature") or None,
        sandbox_limits=_sandbox(obj.get("sandbox")),
        requirements=_requirements(obj.get("requirements")),
        publisher=_publisher(obj.get("publisher")),
        message_schemas=obj.get(schemas_key),
        data_objects=obj.get("dataObjects"),
        hyperty_type=obj.get("hypertyType"),
        mutual_authentication=obj.get("mutualAuthentication"),
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
        raw=obj,
    )


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _object_name(value: Any) -> str:
    if value is None:
        raise DescriptorError("objectName", "missing (the stub's name is required)")
    if not isinstance(value, str):
        raise DescriptorError("objectName", f"expected a string, got {_type(value)}")
    if not _NAME.match(value) or ".." in value:
        raise DescriptorError("objectName", f"{value!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return value


def _version(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DescriptorError("version", f"expected a string or a number, got {_type(value)}")
    if isinstance(value, int) and not -_HUGE < value < _HUGE:
        raise DescriptorError("version", "a number of more than 64 digits is not a version")
    text = value.strip() if isinstance(value, str) else repr(value)
    if len(text) > 64 or any(c.isspace() or ord(c) < 32 for c in text):
        raise DescriptorError("version", f"{text[:70]!r} is not a version (at most 64 characters, no spaces)")
    return text


def _required_text(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise DescriptorError(name, "missing")
    if not isinstance(value, str) or not value.strip():
        raise DescriptorError(name, f"expected a non-empty string, got {_type(value)}")
    return value


def _optional_text(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    raise DescriptorError(name, f"expected a string, got {_type(value)}")


def _object(value: Any, name: str) -> dict[str, Any]:
    """An object field that reTHINK data also writes as ``[]``, ``""`` or a JSON string."""
    if value is None or value == [] or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value.encode("utf-8"))
        except msgspec.DecodeError:
            raise DescriptorError(name, "expected an object, got a string that is not JSON") from None
        if not isinstance(value, dict):
            raise DescriptorError(name, f"expected an object, got a JSON string holding {_type(value)}")
    if not isinstance(value, dict):
        raise DescriptorError(name, f"expected an object, got {_type(value)}")
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DescriptorError(name, f"expected true or false, got {_type(value)}")


def _cguid(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DescriptorError("cguid", f"expected a string or a number, got {_type(value)}")
    if isinstance(value, int) and not -_HUGE < value < _HUGE:
        raise DescriptorError("cguid", "a number of more than 64 digits is not a cguid")
    return value if isinstance(value, str) else repr(value)


def _publisher(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DOMAIN.match(value):
        raise DescriptorError("publisher", f"expected a lower-case domain name, got {value!r}")
    return value


def _requirements(value: Any) -> tuple[str, ...]:
    """``requirements``: a list of PEP 508 requirement strings, each of which must parse."""
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or len(value) > MAX_REQUIREMENTS:
        raise DescriptorError("requirements", f"expected a list of at most {MAX_REQUIREMENTS} strings")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise DescriptorError(f"requirements[{index}]", f"expected a string, got {_type(item)}")
        try:
            Requirement(item)
        except InvalidRequirement as exc:
            raise DescriptorError(f"requirements[{index}]", f"not a requirement ({exc})") from None
    return tuple(value)


def _sandbox(value: Any) -> SandboxLimits | None:
    """The ``sandbox`` field, decoded into the very model the sandbox narrows its limits with."""
    if value is None or value == [] or value == {}:
        return None
    if not isinstance(value, dict):
        raise DescriptorError("sandbox", f"expected an object, got {_type(value)}")
    try:
        return SandboxLimits.from_wire(value)
    except LimitError as exc:
        raise DescriptorError(exc.field, exc.problem) from None


def _package(value: Any, where: str) -> SourcePackage | None:
    if value is None or value == [] or value == {} or value == "":
        return None
    if not isinstance(value, dict):
        raise DescriptorError(where, f"expected an object, got {_type(value)}")
    classname = value.get("sourceCodeClassname")
    if classname is not None and (not isinstance(classname, str) or not _CLASSNAME.match(classname)):
        raise DescriptorError(f"{where}.sourceCodeClassname", f"expected a class name, got {classname!r}")
    code = value.get("sourceCode")
    if code is not None and not isinstance(code, str):
        raise DescriptorError(f"{where}.sourceCode", f"expected a string, got {_type(code)}")
    encoding = value.get("encoding")
    if encoding is not None and not isinstance(encoding, str):
        raise DescriptorError(f"{where}.encoding", f"expected a string, got {_type(encoding)}")
    digest = value.get("sha256")
    if digest is not None:
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise DescriptorError(f"{where}.sha256", f"expected 64 hex digits, got {digest!r}")
        digest = digest.lower()
    md5 = value.get("md5")
    return SourcePackage(
        classname=classname or None,
        source_code=code,
        encoding=encoding or None,
        sha256=digest,
        md5=md5 if isinstance(md5, str) else None,
        raw=value,
    )


def _norm(encoding: str | None) -> str:
    return (encoding or "").strip().lower().replace("-", "").replace("_", "")


def _b64(text: str) -> bytes | None:
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


# -- versions ------------------------------------------------------------------------------------------


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1.  Numeric parts compare as numbers (``1.10 > 1.9``), text parts as text.

    Missing parts count as zero (``1.0 == 1.0.0``) and a word ranks below any number, so a pre-release
    ``1.0.0-rc1`` is older than ``1.0.0``.  A missing version (``""``) equals ``0``.  reTHINK's broker
    may turn ``"1.0"`` into the number ``1.0``; both normalise to the same string, so they compare equal.
    """
    ka, kb = _version_key(a), _version_key(b)
    width = max(len(ka), len(kb))
    # a missing part counts as 0: 1.0 == 1.0.0, and 1.0.0-rc1 < 1.0.0 because a word sorts below 0.
    ka += ((1, 0, ""),) * (width - len(ka))
    kb += ((1, 0, ""),) * (width - len(kb))
    return (ka > kb) - (ka < kb)


def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    parts = _VERSION_PART.findall(version)
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p.lower()) for p in parts)
