# What bench/durability.sh and bench/forward.sh need before they start:
# the object store from the environment (`. /tmp/vpool-ceph/env` after
# scripts/ceph.sh start), the bucket helpers of bench/s3-keys.sh, fio with
# its nbd engine, and the release vpool in $vpool.
# shellcheck shell=bash
endpoint=${VPOOL_TEST_S3_ENDPOINT:?no S3 endpoint: . /tmp/vpool-ceph/env}
bucket=${VPOOL_TEST_S3_BUCKET:?no S3 bucket}
region=${AWS_REGION:-us-east-1}
# shellcheck source=bench/s3-keys.sh
. bench/s3-keys.sh
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine" >&2; exit 1; }
cargo build -q --release -p vpool
# shellcheck disable=SC2034 # used by the scripts that source this one
vpool=$PWD/target/release/vpool
