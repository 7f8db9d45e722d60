# Listing and deleting a bucket's objects with curl, for the benchmarks
# (sourced by bench/s3.sh and bench/durability.sh). Needs $endpoint,
# $bucket, $region and the AWS_* credentials set before it is sourced.
# shellcheck shell=bash

# Signed requests with curl (RGW needs the payload-hash header; see scripts/ceph.sh).
sig=(--aws-sigv4 "aws:amz:$region:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
     -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD')
# list_keys PREFIX: "KEY SIZE" lines of every object under it.
list_keys() {
  python3 - "$endpoint" "$bucket" "$1" "$region" <<'PY'
import os, subprocess, sys, urllib.parse, xml.etree.ElementTree as ET
ep, bucket, prefix, region = sys.argv[1:5]
user = os.environ["AWS_ACCESS_KEY_ID"] + ":" + os.environ["AWS_SECRET_ACCESS_KEY"]
token = None
while True:
    q = {"list-type": "2", "max-keys": "1000", "prefix": prefix}
    if token: q["continuation-token"] = token
    u = f"{ep}/{bucket}?" + urllib.parse.urlencode(sorted(q.items()), quote_via=urllib.parse.quote, safe="")
    out = subprocess.run(["curl", "-sS", "--fail", "--max-time", "60", "--aws-sigv4", f"aws:amz:{region}:s3",
                          "--user", user, "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", u],
                         check=True, capture_output=True).stdout
    root = ET.fromstring(out)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for c in root.iter(ns + "Contents"):
        print(c.find(ns + "Key").text, c.find(ns + "Size").text)
    if root.findtext(ns + "IsTruncated") != "true": break
    token = root.findtext(ns + "NextContinuationToken")
PY
}
delete_prefix() {
  list_keys "$1" | awk '{print $1}' \
    | xargs -r -P 8 -I{} curl -sS -o /dev/null --max-time 60 -X DELETE "${sig[@]}" "$endpoint/$bucket/{}"
}
