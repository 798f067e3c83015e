#!/usr/bin/env bash
# Runs shellcheck over every shell script in the repository: files ending in .sh and files
# whose first line is a sh/bash shebang (.ci/run), outside build output and git.
# The same check runs as a test: tests/repo/manifests_shellcheck.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v shellcheck >/dev/null || {
    echo "check-shell: shellcheck is not installed (Debian: apt-get install shellcheck)" >&2
    exit 2
}

scripts=()
while IFS= read -r -d '' file; do
    case "$file" in
    *.sh) scripts+=("$file") ;;
    *) if head -n1 "$file" | grep -Eq '^#!.*[/ ](ba)?sh( |$)'; then scripts+=("$file"); fi ;;
    esac
done < <(find . \( -name .git -o -name 'target*' -o -name .sluice-cache \) -prune -o -type f \
    \( -name '*.sh' -o -perm -u+x -o -path './.ci/*' \) -print0 | sort -z)

if [ ${#scripts[@]} -eq 0 ]; then
    echo "check-shell: no scripts found" >&2
    exit 2
fi
shellcheck --external-sources "${scripts[@]}"
echo "check-shell: ${#scripts[@]} scripts clean"
