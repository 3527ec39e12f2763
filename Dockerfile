# velero-jupyterhub's image: the static (musl) release binary and a passwd entry, on
# scratch: no shell, no package manager, nothing to patch but the binary. Built by
# scripts/image.sh (buildah, no registry: there is no base image to pull), which stages
# this directory's inputs (the binary, passwd, group) into the build context.
FROM scratch
ARG VERSION
LABEL org.opencontainers.image.title="velero-jupyterhub" \
      org.opencontainers.image.description="Velero file-system backups and restores that work for JupyterHub users' home volumes" \
      org.opencontainers.image.version="${VERSION}"
COPY passwd group /etc/
COPY velero-jupyterhub /usr/local/bin/velero-jupyterhub
# The Deployment's securityContext says the same (runAsNonRoot, 65532).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/velero-jupyterhub"]
CMD ["--help"]
