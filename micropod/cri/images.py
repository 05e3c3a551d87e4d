"""ImageService over micropod's OCI store: the same images `micropod images` lists."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from typing import Any

import grpc

from micropod.context import Context
from micropod.cri.api import pb
from micropod.cri.status import CriError, invalid
from micropod.errors import MicropodError, NotFoundError, UsageError
from micropod.image.credentials import Credentials, CredentialSource, CredentialStore, GivenCredentials
from micropod.image.reference import parse_reference
from micropod.image.settings import canonical_registry
from micropod.image.store import StoredImage


def image_message(image: StoredImage) -> pb.Image:
    digests = []
    for ref in image.refs:
        with contextlib.suppress(UsageError):
            digests.append(f"{parse_reference(ref).repository}@{image.manifest_digest}")
    user = (image.config.user or "").split(":", 1)[0]
    uid = pb.Int64Value(value=int(user)) if user.isdigit() else None
    return pb.Image(id=image.config_digest, repo_tags=list(image.refs), repo_digests=sorted(set(digests)),
                    size=image.size, uid=uid, username="" if user.isdigit() else user,
                    spec=pb.ImageSpec(image=image.config_digest))


def credentials_of(auth: Any, image: str) -> CredentialSource | None:
    if auth.identity_token or auth.registry_token:
        raise invalid("identity and registry tokens are not supported: give a username and password")
    username, password = auth.username, auth.password
    if auth.auth:
        try:
            username, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise invalid("the auth field is not base64 of user:password") from None
    if not username:
        return None
    registry = auth.server_address.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    # kubelet passes a Docker Hub secret's "https://index.docker.io/v1/"
    return GivenCredentials(canonical_registry(registry) if registry else parse_reference(image).domain,
                            Credentials(username, password))


class Images:
    service = "ImageService"

    def ListImages(self, ctx: Context, request: pb.ListImagesRequest) -> pb.ListImagesResponse:
        wanted = request.filter.image.image
        if wanted:
            try:
                return pb.ListImagesResponse(images=[image_message(ctx.images.resolve(wanted))])
            except NotFoundError:
                return pb.ListImagesResponse()
        return pb.ListImagesResponse(images=[image_message(i) for i in ctx.images.list()])

    def ImageStatus(self, ctx: Context, request: pb.ImageStatusRequest) -> pb.ImageStatusResponse:
        try:
            image = ctx.images.resolve(request.image.image)
        except NotFoundError:
            return pb.ImageStatusResponse()  # kubelet's way of hearing "not present": no image, no error
        info = {}
        if request.verbose:
            info["info"] = json.dumps({"manifestDigest": image.manifest_digest, "refs": list(image.refs),
                                       "config": {"entrypoint": list(image.config.entrypoint),
                                                  "cmd": list(image.config.cmd), "env": list(image.config.env),
                                                  "user": image.config.user,
                                                  "workingDir": image.config.working_dir}})
        return pb.ImageStatusResponse(image=image_message(image), info=info)

    def PullImage(self, ctx: Context, request: pb.PullImageRequest) -> pb.PullImageResponse:
        from micropod.image.pull import PullOptions, pull

        name = request.image.image
        if not name:
            raise invalid("PullImage needs an image")
        given = credentials_of(request.auth, name)
        credentials = given or CredentialStore(ctx.root.path / "auth.json")
        options = PullOptions.of_root(ctx.root.path)
        try:
            result = pull(ctx.images, name, credentials=credentials, options=options)
        except UsageError:
            raise
        except MicropodError as exc:
            raise CriError(grpc.StatusCode.UNKNOWN, f'failed to pull and unpack image "{name}": {exc}') from None
        return pb.PullImageResponse(image_ref=result.image.config_digest)

    def RemoveImage(self, ctx: Context, request: pb.RemoveImageRequest) -> pb.RemoveImageResponse:
        try:
            image = ctx.images.resolve(request.image.image)
        except NotFoundError:
            return pb.RemoveImageResponse()  # containerd: removing an image that is gone succeeds
        for ref in image.refs or (image.config_digest,):
            with contextlib.suppress(NotFoundError):
                ctx.images.remove(ref, force=True)
        with contextlib.suppress(NotFoundError):
            ctx.images.remove(image.config_digest, force=True)
        return pb.RemoveImageResponse()

    def ImageFsInfo(self, ctx: Context, request: pb.ImageFsInfoRequest) -> pb.ImageFsInfoResponse:
        path = ctx.root.images
        used, inodes = _usage(path)
        usage = pb.FilesystemUsage(timestamp=time.time_ns(), fs_id=pb.FilesystemIdentifier(mountpoint=str(path)),
                                   used_bytes=pb.UInt64Value(value=used), inodes_used=pb.UInt64Value(value=inodes))
        return pb.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])


def _usage(path: Any) -> tuple[int, int]:
    used = inodes = 0
    for base, dirs, files in os.walk(path):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(base, name))
                used += st.st_blocks * 512
                inodes += 1
    return used, inodes
