"""The management services over real gRPC on the authz port (no Envoy): each method, and its errors as statuses
with a google.rpc.ErrorInfo detail."""

import uuid
from collections.abc import Iterable
from typing import cast

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from google.rpc import error_details_pb2, status_pb2

from driftlock_api.management.v1 import jwks_pb2, jwks_pb2_grpc, keys_pb2, keys_pb2_grpc, orgs_pb2, orgs_pb2_grpc
from tests.conftest import TEST_PLAN
from tests.support.admin import admin_metadata


@pytest.fixture(scope="module")
async def channel(gateway):
    async with grpc.aio.insecure_channel(gateway.authz_target(1)) as opened:
        yield opened


@pytest.fixture
def auth(admin_secret):
    return admin_metadata(admin_secret)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    # grpc-stubs types trailing metadata as _Metadatum objects; grpc.aio hands over (key, value) pairs.
    trailers = dict(cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ()))
    details = trailers["grpc-status-details-bin"]
    assert isinstance(details, bytes)  # a -bin key's value is bytes
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def test_every_key_and_organisation_method(channel, auth):
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    orgs = orgs_pb2_grpc.OrganizationServiceStub(channel)
    org = await orgs.CreateOrganization(
        orgs_pb2.CreateOrganizationRequest(name="gRPC org", plan=TEST_PLAN), metadata=auth
    )
    assert (await orgs.GetOrganization(orgs_pb2.GetOrganizationRequest(org_id=org.id), metadata=auth)) == org
    metadata = Struct()
    metadata.update({"team": "billing"})
    created = await keys.CreateKey(
        keys_pb2.CreateKeyRequest(org_id=org.id, name="k", scopes=["read"], metadata=metadata), metadata=auth
    )
    assert created.key.startswith("dlk_live_") and created.api_key.scopes == ["read"]
    got = await keys.GetKey(keys_pb2.GetKeyRequest(key_id=created.api_key.id), metadata=auth)
    assert got.id == created.api_key.id and got.metadata["team"] == "billing"
    assert not got.HasField("expires_at")
    listed = await keys.ListKeys(keys_pb2.ListKeysRequest(org_id=org.id, page_size=10), metadata=auth)
    assert [k.id for k in listed.keys] == [got.id] and listed.next_page_token == ""

    updated = await keys.UpdateKey(
        keys_pb2.UpdateKeyRequest(key_id=got.id, name="", expires_in_seconds=60), metadata=auth
    )
    assert updated.name == "" and updated.HasField("expires_at")
    forever = await keys.UpdateKey(keys_pb2.UpdateKeyRequest(key_id=got.id, never_expires=True), metadata=auth)
    assert not forever.HasField("expires_at") and forever.scopes == ["read"]

    rolled = await keys.RollKey(keys_pb2.RollKeyRequest(key_id=got.id, overlap_seconds=3600), metadata=auth)
    assert rolled.old_key_id == got.id and rolled.api_key.id != got.id and rolled.key != created.key
    assert rolled.api_key.metadata["team"] == "billing"
    assert rolled.old_expires_at.ToSeconds() - rolled.api_key.created_at.ToSeconds() == pytest.approx(3600, abs=5)
    revoked = await keys.RevokeKey(keys_pb2.RevokeKeyRequest(key_id=rolled.api_key.id), metadata=auth)
    assert revoked.HasField("revoked_at")

    assert (await orgs.SetPlan(orgs_pb2.SetPlanRequest(org_id=org.id, plan="free"), metadata=auth)).plan == "free"
    suspended = await orgs.SuspendOrganization(orgs_pb2.SuspendOrganizationRequest(org_id=org.id), metadata=auth)
    assert suspended.suspended and suspended.HasField("suspended_at")
    resumed = await orgs.ResumeOrganization(orgs_pb2.ResumeOrganizationRequest(org_id=org.id), metadata=auth)
    assert not resumed.suspended
    alerts = await orgs.ListAlerts(orgs_pb2.ListAlertsRequest(org_id=org.id), metadata=auth)
    assert alerts.org_id == org.id and list(alerts.alerts) == []
    await orgs.CreateOrganization(orgs_pb2.CreateOrganizationRequest(name="another"), metadata=auth)
    page = await orgs.ListOrganizations(orgs_pb2.ListOrganizationsRequest(page_size=1), metadata=auth)
    assert len(page.orgs) == 1 and page.next_page_token


async def test_errors_are_statuses_with_a_reason(channel, auth, admin_secret):
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    cases = [
        (keys.GetKey(keys_pb2.GetKeyRequest(key_id=str(uuid.uuid4())), metadata=auth), "NOT_FOUND", "not_found"),
        (keys.GetKey(keys_pb2.GetKeyRequest(key_id="x"), metadata=auth), "INVALID_ARGUMENT", "invalid_argument"),
        (keys.GetKey(keys_pb2.GetKeyRequest(key_id=str(uuid.uuid4()))), "UNAUTHENTICATED", "missing_token"),
        (
            keys.ListKeys(
                keys_pb2.ListKeysRequest(org_id=str(uuid.uuid4())),
                metadata=admin_metadata(admin_secret, org_id=uuid.uuid4()),
            ),
            "PERMISSION_DENIED",
            "wrong_organisation",
        ),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code().name == code
        info = error_info(caught.value)
        assert (info.reason, info.domain) == (reason, "driftlock-gateway") and info.metadata["request_id"]


async def test_the_jwks_needs_no_token(channel, context_signing_keys):
    jwks = await jwks_pb2_grpc.PublicKeyServiceStub(channel).GetJwks(jwks_pb2.GetJwksRequest())
    assert [key.kid for key in jwks.keys] == ["tests-current", "tests-next"]
    assert {key.x for key in jwks.keys} == {key["x"] for key in context_signing_keys[0].jwks()["keys"]}


async def test_an_organisation_token_cannot_do_what_only_an_operator_may(channel, auth, admin_secret):
    orgs = orgs_pb2_grpc.OrganizationServiceStub(channel)
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    org = await orgs.CreateOrganization(
        orgs_pb2.CreateOrganizationRequest(name="customer", plan=TEST_PLAN), metadata=auth
    )
    await orgs.SuspendOrganization(orgs_pb2.SuspendOrganizationRequest(org_id=org.id), metadata=auth)
    mine = admin_metadata(admin_secret, org_id=org.id)
    for call in (
        orgs.ResumeOrganization(orgs_pb2.ResumeOrganizationRequest(org_id=org.id), metadata=mine),
        orgs.SuspendOrganization(orgs_pb2.SuspendOrganizationRequest(org_id=org.id), metadata=mine),
        orgs.SetPlan(orgs_pb2.SetPlanRequest(org_id=org.id, plan="free"), metadata=mine),
        orgs.CreateOrganization(orgs_pb2.CreateOrganizationRequest(name="another"), metadata=mine),
        orgs.ListOrganizations(orgs_pb2.ListOrganizationsRequest(), metadata=mine),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "operator_only"
    still = await orgs.GetOrganization(orgs_pb2.GetOrganizationRequest(org_id=org.id), metadata=mine)
    assert still.suspended and still.plan == TEST_PLAN
    # What a customer may do stays open to its own token.
    created = await keys.CreateKey(keys_pb2.CreateKeyRequest(org_id=org.id, name="mine"), metadata=mine)
    await keys.RevokeKey(keys_pb2.RevokeKeyRequest(key_id=created.api_key.id), metadata=mine)
    await orgs.ListAlerts(orgs_pb2.ListAlertsRequest(org_id=org.id), metadata=mine)


async def test_an_org_id_claim_of_null_is_refused_not_an_operator(channel, admin_secret):
    import time

    import jwt

    now = int(time.time())
    claims = {"iss": "dashboard", "aud": "driftlock-gateway", "iat": now, "exp": now + 60, "org_id": None}
    token = jwt.encode(claims, admin_secret.encode(), algorithm="HS256")
    orgs = orgs_pb2_grpc.OrganizationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orgs.ListOrganizations(
            orgs_pb2.ListOrganizationsRequest(), metadata=[("authorization", f"Bearer {token}")]
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_or_rolled_away_key_never_gets_its_expiry_back(channel, auth):
    orgs = orgs_pb2_grpc.OrganizationServiceStub(channel)
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    org = await orgs.CreateOrganization(orgs_pb2.CreateOrganizationRequest(name="rolls", plan=TEST_PLAN), metadata=auth)
    rolled = (await keys.CreateKey(keys_pb2.CreateKeyRequest(org_id=org.id), metadata=auth)).api_key
    successor = await keys.RollKey(keys_pb2.RollKeyRequest(key_id=rolled.id, overlap_seconds=4), metadata=auth)
    revoked = (await keys.CreateKey(keys_pb2.CreateKeyRequest(org_id=org.id), metadata=auth)).api_key
    await keys.RevokeKey(keys_pb2.RevokeKeyRequest(key_id=revoked.id), metadata=auth)
    for key_id in (rolled.id, revoked.id):
        for change in ({"never_expires": True}, {"expires_in_seconds": 3600}):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await keys.UpdateKey(keys_pb2.UpdateKeyRequest(key_id=key_id, **change), metadata=auth)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(caught.value).reason == "failed_precondition"
    old = await keys.GetKey(keys_pb2.GetKeyRequest(key_id=rolled.id), metadata=auth)
    assert old.expires_at == successor.old_expires_at
    # A rename of either is still fine: only the expiry is what could bring a secret back.
    assert (await keys.UpdateKey(keys_pb2.UpdateKeyRequest(key_id=rolled.id, name="old"), metadata=auth)).name == "old"


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "a\x00b"},
        {"name": "line\nbreak"},
        {"name": "bell\x07"},
        {"metadata": {"te\x00am": "x"}},
        {"metadata": {"team\n": "x"}},
        {"metadata": {"team": "x\x00"}},
    ],
)
async def test_control_characters_in_names_and_metadata_keys_are_refused(channel, auth, bad):
    orgs = orgs_pb2_grpc.OrganizationServiceStub(channel)
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    org = await orgs.CreateOrganization(orgs_pb2.CreateOrganizationRequest(name="names", plan=TEST_PLAN), metadata=auth)
    request = keys_pb2.CreateKeyRequest(org_id=org.id, name=bad.get("name", ""))
    if "metadata" in bad:
        request.metadata.update(bad["metadata"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.CreateKey(request, metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    key = (await keys.CreateKey(keys_pb2.CreateKeyRequest(org_id=org.id), metadata=auth)).api_key
    update = keys_pb2.UpdateKeyRequest(key_id=key.id, name=bad.get("name", "ok"))
    if "metadata" in bad:
        update.metadata.update(bad["metadata"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.UpdateKey(update, metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing was stored that breaks a later call.
    listed = await keys.ListKeys(keys_pb2.ListKeysRequest(org_id=org.id), metadata=auth)
    assert [k.id for k in listed.keys] == [key.id]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orgs.CreateOrganization(orgs_pb2.CreateOrganizationRequest(name="org\x00name"), metadata=auth)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
