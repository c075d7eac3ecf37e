"""Sends one event of each type through a vendor's Python SDK, unchanged, to a data plane.

usage: python_sdk.py rudderstack|segment DATA_PLANE_URL WRITE_KEY PREFIX
Prints the messageIds it sent, one JSON list on stdout; exits 1 if the SDK reported an
error. Used by crates/ballast/tests/sdk_compat.rs.
"""
import json
import sys

sdk, url, write_key, prefix = sys.argv[1:5]
if sdk == "rudderstack":
    from rudderstack.analytics import Client
elif sdk == "segment":
    from segment.analytics import Client
else:
    sys.exit(f"unknown sdk {sdk}")

errors = []
client = Client(
    write_key=write_key,
    host=url,
    on_error=lambda error, batch: errors.append(repr(error)),
    max_retries=3,
    upload_interval=0.1,
)
sent = []


def mid(kind):
    m = f"{prefix}-{kind}"
    sent.append(m)
    return m


client.identify(user_id="py-user", traits={"plan": "pro"}, message_id=mid("identify"))
client.track(user_id="py-user", event="Song Played", properties={"n": 1}, message_id=mid("track"))
client.page(user_id="py-user", category="Docs", name="Home", properties={"path": "/"}, message_id=mid("page"))
client.screen(user_id="py-user", name="Settings", properties={"tab": 2}, message_id=mid("screen"))
client.group(user_id="py-user", group_id="g-1", traits={"size": 3}, message_id=mid("group"))
client.alias(previous_id="py-anon", user_id="py-user", message_id=mid("alias"))
client.track(anonymous_id="py-anon-2", event="Anonymous", properties={}, message_id=mid("anon"))
client.flush()
client.join()
print(json.dumps(sent))
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
