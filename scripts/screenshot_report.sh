#!/usr/bin/env bash
# Renders a report's index.html in headless Chromium and saves a full-page screenshot, to check the
# page renders offline (no network is used: the page is self-contained).
# Usage: scripts/screenshot_report.sh [results/report/index.html] [out.png]
# Needs chromium (Debian/Ubuntu: apt-get install chromium).
set -euo pipefail
html="$(realpath "${1:-results/report/index.html}")"
png="${2:-$(dirname "$html")/screenshot.png}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "chromium not found (apt-get install chromium)" >&2; exit 1; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2400 \
    --screenshot="$png" "file://$html" 2>/dev/null
echo "$png"
