#!/bin/sh
# The e2e workload (busybox sh): HTTP on ports 80 and 81 whose /cgi-bin/ip answers
# with the client address the server saw, so a check can tell a preserved source
# address from a SNATed one. Mounted into every e2e pod from the e2e-server
# ConfigMap, and run by the "load balancer" container outside the cluster.
set -eu
mkdir -p /www/cgi-bin
cat > /www/cgi-bin/ip <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$REMOTE_ADDR"
CGI
chmod +x /www/cgi-bin/ip
httpd -p 81 -h /www
exec httpd -f -p 80 -h /www
