"""header_bytes.py writes protobuf by hand: what it writes must be what protobuf itself means."""

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import given
from hypothesis import strategies as st

from authz_service.check.header_bytes import response_headers_to_add

OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


def expected(headers: dict[str, str]) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        ok_response=external_auth_pb2.OkHttpResponse(
            response_headers_to_add=[
                HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=OVERWRITE)
                for name, value in headers.items()
            ]
        )
    )


def test_the_limit_headers_parse_as_protobuf_serialises_them():
    headers = {
        "x-ratelimit-limit": "50",
        "x-ratelimit-remaining": "49",
        "ratelimit-policy": '"rate";q=50;w=1, "quota";q=100000;w=2678400',
        "ratelimit": '"rate";r=49;t=1, "quota";r=' + "9" * 200 + ";t=1036800",  # a length past one varint byte
    }
    written = response_headers_to_add(headers)
    assert written == expected(headers).SerializeToString()
    assert external_auth_pb2.CheckResponse.FromString(written) == expected(headers)


def test_appended_to_an_allow_the_headers_merge_into_it():
    base = external_auth_pb2.CheckResponse(ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=["x-a"]))
    merged = external_auth_pb2.CheckResponse.FromString(
        base.SerializeToString() + response_headers_to_add({"ratelimit": '"rate";r=1;t=1'})
    )
    assert list(merged.ok_response.headers_to_remove) == ["x-a"]
    assert [(h.header.key, h.header.value) for h in merged.ok_response.response_headers_to_add] == [
        ("ratelimit", '"rate";r=1;t=1')
    ]


@pytest.mark.parametrize("value_length", range(95, 135))
def test_entries_either_side_of_a_one_byte_length_parse_as_protobuf_serialises_them(value_length):
    headers = {"ratelimit": "r" * value_length, "x-ratelimit-remaining": "é" * (value_length // 2)}
    assert response_headers_to_add(headers) == expected(headers).SerializeToString()


@given(st.dictionaries(st.text(min_size=1, max_size=40), st.text(max_size=300), max_size=6))
def test_any_headers_parse_as_protobuf_serialises_them(headers):
    assert external_auth_pb2.CheckResponse.FromString(response_headers_to_add(headers)) == expected(headers)
