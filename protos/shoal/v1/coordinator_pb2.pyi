from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("id", "url", "capacity_bytes", "used_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    url: str
    capacity_bytes: int
    used_bytes: int
    def __init__(self, id: _Optional[str] = ..., url: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("membership_ttl_ms",)
    MEMBERSHIP_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    membership_ttl_ms: int
    def __init__(self, membership_ttl_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "evict")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    known: bool
    evict: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known: _Optional[bool] = ..., evict: _Optional[_Iterable[str]] = ...) -> None: ...

class Content(_message.Message):
    __slots__ = ("digest", "size", "media_type", "accessed_at")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    ACCESSED_AT_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    media_type: str
    accessed_at: float
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., media_type: _Optional[str] = ..., accessed_at: _Optional[float] = ...) -> None: ...

class AnnounceInventoryRequest(_message.Message):
    __slots__ = ("node_id", "content", "ttl_ms", "batch_id", "last")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    content: _containers.RepeatedCompositeFieldContainer[Content]
    ttl_ms: int
    batch_id: str
    last: bool
    def __init__(self, node_id: _Optional[str] = ..., content: _Optional[_Iterable[_Union[Content, _Mapping]]] = ..., ttl_ms: _Optional[int] = ..., batch_id: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class AnnounceInventoryResponse(_message.Message):
    __slots__ = ("evict", "more")
    EVICT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    evict: _containers.RepeatedScalarFieldContainer[str]
    more: bool
    def __init__(self, evict: _Optional[_Iterable[str]] = ..., more: _Optional[bool] = ...) -> None: ...

class AddContentRequest(_message.Message):
    __slots__ = ("node_id", "content", "ttl_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    content: _containers.RepeatedCompositeFieldContainer[Content]
    ttl_ms: int
    def __init__(self, node_id: _Optional[str] = ..., content: _Optional[_Iterable[_Union[Content, _Mapping]]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class AddContentResponse(_message.Message):
    __slots__ = ("evict",)
    EVICT_FIELD_NUMBER: _ClassVar[int]
    evict: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, evict: _Optional[_Iterable[str]] = ...) -> None: ...

class DropContentRequest(_message.Message):
    __slots__ = ("node_id", "digests")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class DropContentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportBadCopyRequest(_message.Message):
    __slots__ = ("node_id", "holder_id", "digest")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    holder_id: str
    digest: str
    def __init__(self, node_id: _Optional[str] = ..., holder_id: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ReportBadCopyResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("digest", "lease_key")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEY_FIELD_NUMBER: _ClassVar[int]
    digest: str
    lease_key: str
    def __init__(self, digest: _Optional[str] = ..., lease_key: _Optional[str] = ...) -> None: ...

class Holder(_message.Message):
    __slots__ = ("node_id", "url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    url: str
    def __init__(self, node_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("holders", "fetcher", "fetching", "content", "failure")
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    FETCHER_FIELD_NUMBER: _ClassVar[int]
    FETCHING_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    fetcher: Holder
    fetching: bool
    content: Content
    failure: str
    def __init__(self, holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., fetcher: _Optional[_Union[Holder, _Mapping]] = ..., fetching: _Optional[bool] = ..., content: _Optional[_Union[Content, _Mapping]] = ..., failure: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("digest", "key", "node_id", "ttl_ms", "token")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    digest: str
    key: str
    node_id: str
    ttl_ms: int
    token: str
    def __init__(self, digest: _Optional[str] = ..., key: _Optional[str] = ..., node_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("holders", "granted", "token", "fence", "fetcher")
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    FETCHER_FIELD_NUMBER: _ClassVar[int]
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    granted: bool
    token: str
    fence: int
    fetcher: Holder
    def __init__(self, holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ..., granted: _Optional[bool] = ..., token: _Optional[str] = ..., fence: _Optional[int] = ..., fetcher: _Optional[_Union[Holder, _Mapping]] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("key", "node_id", "ttl_ms", "token")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    key: str
    node_id: str
    ttl_ms: int
    token: str
    def __init__(self, key: _Optional[str] = ..., node_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class AcquireLeaseResponse(_message.Message):
    __slots__ = ("granted", "token", "fence", "holder")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    token: str
    fence: int
    holder: Holder
    def __init__(self, granted: _Optional[bool] = ..., token: _Optional[str] = ..., fence: _Optional[int] = ..., holder: _Optional[_Union[Holder, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("key", "token", "ttl_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    token: str
    ttl_ms: int
    def __init__(self, key: _Optional[str] = ..., token: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("renewed",)
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    renewed: bool
    def __init__(self, renewed: _Optional[bool] = ...) -> None: ...

class CompleteFetchRequest(_message.Message):
    __slots__ = ("key", "token", "node_id", "content", "ttl_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    token: str
    node_id: str
    content: Content
    ttl_ms: int
    def __init__(self, key: _Optional[str] = ..., token: _Optional[str] = ..., node_id: _Optional[str] = ..., content: _Optional[_Union[Content, _Mapping]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class CompleteFetchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortFetchRequest(_message.Message):
    __slots__ = ("key", "token", "failure")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    key: str
    token: str
    failure: str
    def __init__(self, key: _Optional[str] = ..., token: _Optional[str] = ..., failure: _Optional[str] = ...) -> None: ...

class AbortFetchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TouchRequest(_message.Message):
    __slots__ = ("node_id", "digests")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class TouchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TagPointer(_message.Message):
    __slots__ = ("digest", "media_type", "size", "checked_at")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    digest: str
    media_type: str
    size: int
    checked_at: float
    def __init__(self, digest: _Optional[str] = ..., media_type: _Optional[str] = ..., size: _Optional[int] = ..., checked_at: _Optional[float] = ...) -> None: ...

class GetTagRequest(_message.Message):
    __slots__ = ("upstream", "repository", "tag")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    repository: str
    tag: str
    def __init__(self, upstream: _Optional[str] = ..., repository: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class GetTagResponse(_message.Message):
    __slots__ = ("found", "pointer")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    found: bool
    pointer: TagPointer
    def __init__(self, found: _Optional[bool] = ..., pointer: _Optional[_Union[TagPointer, _Mapping]] = ...) -> None: ...

class PutTagRequest(_message.Message):
    __slots__ = ("upstream", "repository", "tag", "pointer", "lease_token", "release")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    repository: str
    tag: str
    pointer: TagPointer
    lease_token: str
    release: bool
    def __init__(self, upstream: _Optional[str] = ..., repository: _Optional[str] = ..., tag: _Optional[str] = ..., pointer: _Optional[_Union[TagPointer, _Mapping]] = ..., lease_token: _Optional[str] = ..., release: _Optional[bool] = ...) -> None: ...

class PutTagResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ConfirmBindingsRequest(_message.Message):
    __slots__ = ("upstream", "repository", "digests", "ttl_ms")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    repository: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    ttl_ms: int
    def __init__(self, upstream: _Optional[str] = ..., repository: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ConfirmBindingsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBindingsRequest(_message.Message):
    __slots__ = ("upstream", "repository", "digests")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    repository: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upstream: _Optional[str] = ..., repository: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class Binding(_message.Message):
    __slots__ = ("digest", "ttl_ms")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    ttl_ms: int
    def __init__(self, digest: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class GetBindingsResponse(_message.Message):
    __slots__ = ("bindings",)
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    bindings: _containers.RepeatedCompositeFieldContainer[Binding]
    def __init__(self, bindings: _Optional[_Iterable[_Union[Binding, _Mapping]]] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("node_id", "worker_id", "sequence", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    worker_id: str
    sequence: int
    counters: _containers.ScalarMap[str, int]
    def __init__(self, node_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., sequence: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeMetrics(_message.Message):
    __slots__ = ("node_id", "counters", "live")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    counters: _containers.ScalarMap[str, int]
    live: bool
    def __init__(self, node_id: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ..., live: _Optional[bool] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("nodes", "cluster")
    class ClusterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeMetrics]
    cluster: _containers.ScalarMap[str, int]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeMetrics, _Mapping]]] = ..., cluster: _Optional[_Mapping[str, int]] = ...) -> None: ...
