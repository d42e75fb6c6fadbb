import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageHistoryRequest(_message.Message):
    __slots__ = ("org_id", "granularity", "start", "end", "group_by")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    granularity: str
    start: str
    end: str
    group_by: str
    def __init__(self, org_id: _Optional[str] = ..., granularity: _Optional[str] = ..., start: _Optional[str] = ..., end: _Optional[str] = ..., group_by: _Optional[str] = ...) -> None: ...

class DeniedRequests(_message.Message):
    __slots__ = ("access", "payment", "quota", "rate", "unavailable")
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    access: int
    payment: int
    quota: int
    rate: int
    unavailable: int
    def __init__(self, access: _Optional[int] = ..., payment: _Optional[int] = ..., quota: _Optional[int] = ..., rate: _Optional[int] = ..., unavailable: _Optional[int] = ...) -> None: ...

class UsageBucket(_message.Message):
    __slots__ = ("start", "product", "key_id", "billable_units", "refunded_units", "requests", "denied_requests", "denied")
    START_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BILLABLE_UNITS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DENIED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    product: str
    key_id: str
    billable_units: int
    refunded_units: int
    requests: int
    denied_requests: int
    denied: DeniedRequests
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., product: _Optional[str] = ..., key_id: _Optional[str] = ..., billable_units: _Optional[int] = ..., refunded_units: _Optional[int] = ..., requests: _Optional[int] = ..., denied_requests: _Optional[int] = ..., denied: _Optional[_Union[DeniedRequests, _Mapping]] = ...) -> None: ...

class GetUsageHistoryResponse(_message.Message):
    __slots__ = ("buckets", "granularity", "group_by", "start", "end")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedCompositeFieldContainer[UsageBucket]
    granularity: str
    group_by: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, buckets: _Optional[_Iterable[_Union[UsageBucket, _Mapping]]] = ..., granularity: _Optional[str] = ..., group_by: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetKeyUsageRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class KeyUsage(_message.Message):
    __slots__ = ("key_id", "org_id", "period_start", "period_end", "billable_units", "requests", "refunded_units")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    BILLABLE_UNITS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    org_id: str
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    billable_units: int
    requests: int
    refunded_units: int
    def __init__(self, key_id: _Optional[str] = ..., org_id: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., billable_units: _Optional[int] = ..., requests: _Optional[int] = ..., refunded_units: _Optional[int] = ...) -> None: ...

class ListAuditEntriesRequest(_message.Message):
    __slots__ = ("org_id", "since", "action", "key_id", "page_size", "page_token")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    since: str
    action: str
    key_id: str
    page_size: int
    page_token: str
    def __init__(self, org_id: _Optional[str] = ..., since: _Optional[str] = ..., action: _Optional[str] = ..., key_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("at", "action", "code", "key_id", "actor_issuer", "actor_subject", "request_id")
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ISSUER_FIELD_NUMBER: _ClassVar[int]
    ACTOR_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    action: str
    code: str
    key_id: str
    actor_issuer: str
    actor_subject: str
    request_id: str
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., action: _Optional[str] = ..., code: _Optional[str] = ..., key_id: _Optional[str] = ..., actor_issuer: _Optional[str] = ..., actor_subject: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DenialCount(_message.Message):
    __slots__ = ("minute", "code", "count")
    MINUTE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    minute: _timestamp_pb2.Timestamp
    code: str
    count: int
    def __init__(self, minute: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., code: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ListAuditEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token", "denials_per_minute")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DENIALS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    next_page_token: str
    denials_per_minute: _containers.RepeatedCompositeFieldContainer[DenialCount]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., denials_per_minute: _Optional[_Iterable[_Union[DenialCount, _Mapping]]] = ...) -> None: ...
