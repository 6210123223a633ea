"""Preload one repository: ensemble, catalog walk, object fetch, commit (the async adapter).

Order of writes: objects and catalogs (each verified, then renamed into ``data/``), the
certificate, the whitelist, and the manifest last, so the store never names a missing object.

A selection that is the whole revision also stores the manifest's meta-information object and,
after everything else, marks the repository as a replica (``.cvmfs_master_replica``, what
``cvmfs_preload`` and ``cvmfs_swissknife pull`` want to see); any other selection removes that
marker before it changes anything in the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass

from cvmfs_download.wire import Transport
from cvmfs_format.catalog import Catalog, CatalogTree
from cvmfs_format.errors import FormatError
from cvmfs_format.hashes import ContentHash
from cvmfs_format.manifest import Manifest, parse_manifest
from cvmfs_format.objects import Suffix, verify_object
from cvmfs_format.rsa_keys import RsaPublicKey
from cvmfs_format.store import MANIFEST, WHITELIST, mark_replica, unmark_replica
from cvmfs_format.verify import verify_ensemble
from preload.fetch import FetchConfig, Fetcher, FetchError, unique_tmp
from preload.progress import Progress, RepoReport
from preload.rules import Kind
from preload.selection import Selection, Selector, Wanted
from preload.spec import RepoSpec
from preload.store import ObjectWriter, RepoStore

SMALL_OBJECT = 1 << 20  # uncompressed bytes: objects up to this are fetched into memory

log = logging.getLogger("preload")


class PreloadError(Exception):
    """A repository could not be preloaded; ``str()`` is the one-line reason."""


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    prune: bool = False
    allow_expired_whitelist: bool = False


@dataclass
class Ensemble:
    manifest: Manifest
    manifest_raw: bytes
    whitelist_raw: bytes
    certificate_raw: bytes
    metainfo_raw: bytes | None
    server: str


class RepoPreload:
    def __init__(
        self,
        repo: RepoSpec,
        keys: list[RsaPublicKey],
        store: RepoStore,
        fetch_config: FetchConfig,
        transport: Transport,
        options: Options,
        progress: Progress,
    ) -> None:
        self.repo = repo
        self.keys = keys
        self.store = store
        self.options = options
        self.progress = progress
        self.config = fetch_config
        self.report = RepoReport(repo.name)
        self.switches: dict[str, int] = {}  # "switched to …" said -> requests since
        self.fetcher = Fetcher(repo.servers, repo.proxies, fetch_config, transport, self._note)
        self.present: set[str] = set()

    def _note(self, msg: str) -> None:
        """Said once on stderr as it happens, and kept for the JSON summary; more requests
        switching to the same server or proxy are counted (:meth:`_repeats`), not repeated."""
        head = msg.partition(" after: ")[0]
        if head.startswith("switched to ") and head in self.switches:
            self.switches[head] += 1
            return
        self.switches.setdefault(head, 0)
        self.report.failover.append(msg)
        if log.isEnabledFor(logging.WARNING):
            self.progress.message(f"preload: {self.repo.name}: {msg}")

    def _repeats(self) -> None:
        """How many more requests switched as said (once, at the end of the run)."""
        for head, more in list(self.switches.items()):
            if more:
                self.switches[head] = 0
                msg = f"{more} more request{'s' if more > 1 else ''} {head}"
                self.report.failover.append(msg)
                if log.isEnabledFor(logging.WARNING):
                    self.progress.message(f"preload: {self.repo.name}: {msg}")

    def _check_selection(self, selection: Selection, revision: int) -> None:
        """Warn once per include rule that matched nothing; a selection of no file at all
        fails the repository (a spec that preloads nothing is a mistake, not a success)."""
        for rule in self.repo.rules.explicit_includes:
            hit = selection.matched.get(rule)
            if hit is None:
                why = "matches nothing"
            elif not hit and rule.kind is Kind.EXACT:
                why = f"names a directory: it selects none of its files (write {rule.path}/*)"
            else:
                continue
            line = f"{rule.source}: rule {rule.text!r} {why} (revision {revision})"
            self.report.warnings.append(line)
            log.warning("%s: %s", self.repo.name, line)
        if selection.files == 0:
            raise PreloadError(
                f"the spec selects no file of revision {revision} (see its include rules); "
                "the store keeps its previous revision"
            )

    # -- ensemble -------------------------------------------------------------------------

    async def _ensemble_from_server(self) -> Ensemble:
        manifest_raw = await self.fetcher.fetch_bytes(MANIFEST)
        server = self.fetcher.current_server
        signed = parse_manifest(manifest_raw).manifest
        if signed.certificate is None:
            raise FormatError(f"{server}/{MANIFEST}: no certificate (key X)")
        whitelist_raw = await self.fetcher.fetch_bytes(WHITELIST)
        cert_rel = signed.certificate.object_path(Suffix.CERTIFICATE)
        cert_raw = self._stored_object(cert_rel)
        if cert_raw is not None and ContentHash.of(cert_raw, signed.certificate.algorithm) != (
            signed.certificate
        ):
            cert_raw = None
        if cert_raw is None:
            cert_raw = await self.fetcher.fetch_bytes(cert_rel, signed.certificate)
        return self._verify(manifest_raw, whitelist_raw, cert_raw, server)

    def _verify(
        self, manifest_raw: bytes, whitelist_raw: bytes, cert_raw: bytes, where: str
    ) -> Ensemble:
        certs = {}
        m0 = parse_manifest(manifest_raw).manifest
        if m0.certificate is not None:
            certs[m0.certificate.object_path(Suffix.CERTIFICATE)] = cert_raw

        def read(rel: str) -> bytes:
            try:
                return certs[rel]
            except KeyError:
                raise FormatError(f"{where}: {rel} not fetched") from None

        try:
            manifest = verify_ensemble(
                manifest_raw,
                whitelist_raw,
                read,
                self.repo.name,
                self.keys,
                dt.datetime.now(dt.UTC),
                self.options.allow_expired_whitelist,
            )
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        return Ensemble(manifest, manifest_raw, whitelist_raw, cert_raw, None, where)

    def _stored_object(self, rel: str) -> bytes | None:
        """An object already in the store (immutable by name; verified by the caller)."""
        try:
            return (self.store.dir / rel).read_bytes()
        except OSError:
            return None

    async def fetch_ensemble(self) -> Ensemble:
        """Manifest, whitelist and certificate, verified; an invalid set tries the next server."""
        errors: list[str] = []
        servers = self.fetcher.servers
        for _ in servers:
            try:
                return await self._ensemble_from_server()
            except FormatError as e:
                errors.append(str(e))
                self.fetcher.reject_server(self.fetcher.current_server)
                if len(errors) < len(servers):
                    self._note(f"{e}; trying {self.fetcher.current_server}")
        raise PreloadError("; ".join(errors))

    def stored_ensemble(self) -> Ensemble | None:
        raw = self.store.manifest_bytes()
        if raw is None:
            return None
        try:
            m = parse_manifest(raw).manifest
            assert m.certificate is not None
            cert = self.store.local.read(m.certificate.object_path(Suffix.CERTIFICATE))
            wl = self.store.local.read(WHITELIST)
            return self._verify(raw, wl, cert, f"store {self.store.dir}")
        except (FormatError, AssertionError):
            return None

    # -- catalogs -------------------------------------------------------------------------

    async def load_catalog(self, h: ContentHash, what: str, size: int) -> Catalog:
        """``size``: the uncompressed size its parent (or the manifest) gives; 0 unknown."""
        rel = h.object_path(Suffix.CATALOG)
        if rel in self.present:
            stored = self.store.local.read(rel)
        else:
            stored = await self.fetcher.fetch_bytes(rel, h, size or None)
            self.report.catalogs_fetched += 1
            self.report.bytes_fetched += len(stored)
            if not self.options.dry_run:
                await asyncio.to_thread(self.store.write_object, rel, stored)
                self.present.add(rel)
        try:
            return Catalog(verify_object(stored, h, what), what)
        except FormatError as e:
            raise PreloadError(f"{rel}: {e}") from None

    async def select(self, manifest: Manifest) -> Selection:
        root = await self.load_catalog(
            manifest.root_catalog, "root catalog", manifest.root_catalog_size
        )
        if root.revision != manifest.revision:
            raise PreloadError(
                f"root catalog revision {root.revision} != manifest revision {manifest.revision}"
            )
        selector = Selector(
            CatalogTree(root), manifest.root_catalog, self.repo.rules, self.repo.access_paths
        )
        while True:
            needed = await asyncio.to_thread(selector.step)
            if not needed:
                break
            catalogs = await asyncio.gather(
                *(
                    self.load_catalog(ref.hash, f"nested catalog {ref.path}", ref.size)
                    for ref in needed
                )
            )
            for ref, cat in zip(needed, catalogs, strict=True):
                selector.attach(ref, cat)
        return selector.result

    # -- objects --------------------------------------------------------------------------

    async def fetch_objects(self, missing: list[Wanted]) -> None:
        """Fetch every object, ``concurrency`` at a time.  Small ones are verified in memory
        and written by :class:`ObjectWriter`'s thread; big ones stream into a temp file on
        the way (hashed as they come), renamed into place once verified."""
        todo = iter(missing)
        failure: list[BaseException] = []
        writer = ObjectWriter(self.store)
        report, progress, fetcher, store = self.report, self.progress, self.fetcher, self.store

        async def worker() -> None:
            for w in todo:
                if failure:
                    return
                try:
                    if w.size <= SMALL_OBJECT:
                        data = await fetcher.fetch_object(w.relpath, w.hash, w.size, w.suffix)
                        if writer.error is not None:
                            raise writer.error
                        writer.put(w.relpath, data)
                        stored = len(data)
                        await writer.room()
                    else:
                        tmp = unique_tmp(store.tmp_dir, w.relpath)
                        stored = await fetcher.fetch_to_file(w.relpath, w.hash, tmp, w.size)
                        store.commit_now(str(tmp), w.relpath)
                except FetchError as e:
                    failure.append(PreloadError(f"{w.path}: {e}"))
                    return
                except OSError as e:
                    failure.append(PreloadError(f"{e.filename}: {e.strerror}"))
                    return
                report.objects_fetched += 1
                report.bytes_fetched += stored
                progress.advance(stored, w.size)

        workers = [asyncio.create_task(worker()) for _ in range(self.config.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in workers:
                t.cancel()
            await writer.close()
        if failure:
            raise failure[0]
        if writer.error is not None:
            e = writer.error
            raise PreloadError(f"{e.filename}: {e.strerror}")

    async def _store_metainfo(self, m: Manifest) -> str | None:
        """The manifest's meta-information object, if it names one (part of a replica:
        ``cvmfs_preload`` fetches it); returns its path."""
        if m.metainfo is None:
            return None
        rel = m.metainfo.object_path(Suffix.METAINFO)
        if rel not in self.present:
            stored = await self.fetcher.fetch_bytes(rel, m.metainfo)
            self.report.bytes_fetched += len(stored)
            await asyncio.to_thread(self.store.write_object, rel, stored)
        return rel

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> RepoReport:
        t0 = time.monotonic()
        r = self.report
        old = self.store.manifest_bytes()
        old_manifest = parse_manifest(old).manifest if old else None
        r.previous_revision = old_manifest.revision if old_manifest else None
        try:
            ens = await self.fetch_ensemble()
        except FetchError as e:
            raise PreloadError(str(e)) from None
        m = ens.manifest
        pin = self.repo.revision
        if pin is not None and m.revision != pin:
            stored = self.stored_ensemble()
            if stored is None or stored.manifest.revision != pin:
                raise PreloadError(
                    f"spec pins revision {pin} but {ens.server} publishes revision {m.revision} "
                    "(Stratum-1s serve only their newest manifest)"
                )
            self._note(f"pinned at revision {pin}; servers publish {m.revision}, store kept")
            ens = stored
            m = ens.manifest
        if old_manifest and m.revision < old_manifest.revision:
            raise PreloadError(
                f"{ens.server} publishes revision {m.revision}, older than the store's "
                f"revision {old_manifest.revision}; refusing to roll back"
            )
        r.revision, r.server = m.revision, ens.server
        if not self.options.dry_run:
            await asyncio.to_thread(self.store.prepare)
        self.present = await asyncio.to_thread(self.store.present)
        try:
            selection = await self.select(m)
            self._check_selection(selection, m.revision)
            r.files, r.file_bytes = selection.files, selection.file_bytes
            r.objects, r.catalogs = len(selection.objects), len(selection.catalogs)
            r.whole = selection.whole
            missing = [w for rel, w in selection.objects.items() if rel not in self.present]
            r.objects_present = r.objects - len(missing)
            r.to_fetch_objects = len(missing)
            r.to_fetch_bytes = sum(w.size for w in missing)
            if self.options.dry_run:
                r.status = "dry-run"
                return r
            if not selection.whole:
                # before the published revision (or, with --prune, its objects) can change
                await asyncio.to_thread(unmark_replica, self.store.dir)
            # big objects first: they dominate the tail otherwise
            missing.sort(key=lambda w: -w.size)
            self.progress.begin(self.repo.name, len(missing), r.to_fetch_bytes)
            await self.fetch_objects(missing)
            self.progress.clear()
            assert m.certificate is not None
            await asyncio.to_thread(
                self.store.write_object,
                m.certificate.object_path(Suffix.CERTIFICATE),
                ens.certificate_raw,
            )
            metainfo = await self._store_metainfo(m) if selection.whole else None
            stale_wl = old is not None and self.store.local.read(WHITELIST) != ens.whitelist_raw
            if ens.manifest_raw != old or stale_wl:
                await asyncio.to_thread(
                    self.store.write_ensemble, ens.whitelist_raw, ens.manifest_raw
                )
            if self.options.prune:
                keep = set(selection.objects) | selection.catalog_paths()
                keep.add(m.certificate.object_path(Suffix.CERTIFICATE))
                if metainfo:
                    keep.add(metainfo)
                r.pruned_objects, r.pruned_bytes = await asyncio.to_thread(self.store.prune, keep)
            if selection.whole:
                # last: the revision is complete and published
                await asyncio.to_thread(mark_replica, self.store.dir, self.store.tmp_dir)
        except (FetchError, FormatError) as e:
            raise PreloadError(str(e)) from None
        finally:
            self.progress.clear()
            self._repeats()
            if not self.options.dry_run:
                self.store.cleanup()
            r.seconds = time.monotonic() - t0
        return r
