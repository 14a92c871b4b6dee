// Package imagecache is the agent's per-pool image cache: it materializes an
// image URL into a verified, read-only, content-addressed file on first use,
// and makes VM root disks as qcow2 overlays backed by those files.
//
// # Pools and layout
//
// Each storage pool is a directory. The cache owns <pool>/images and creates
// <pool>/vms for the agent's VM disks:
//
//	<pool>/images/lock            flock(2): one process per pool
//	<pool>/images/sha256/<hex>    committed images, mode 0444, named by sha256
//	<pool>/images/index/<hex>.json metadata: format, sizes, URLs, last use, pins
//	<pool>/images/ingest/<key>.part  download in progress (key = sha256 of
//	                                 URL, expected digest and format)
//	<pool>/images/ingest/<key>.json  its resume sidecar (URL, validators,
//	                                 bytes, serialized sha256 state)
//	<pool>/vms/                   VM disks (the agent's)
//
// No file name is ever built from request text: images are named by their
// digest (64 lowercase hex, checked), ingest files by a hash of the request,
// and overlay destinations are resolved (symlinks included) and must lie
// inside the pool directory, outside images/.
//
// # Ingest, then commit
//
// A download streams into the ingest file while sha256 is computed in the
// same pass: reader, hasher and writer are three goroutines sharing four
// 4 MiB buffers, so receiving, hashing and writing overlap and the file is
// never read back. Block-aligned data is written with O_DIRECT (through a
// second descriptor), straight from the buffers to the disk: no page-cache
// copy, and the disk works during the download instead of at the final
// fsync. Where O_DIRECT is unavailable, and for unaligned tails, writes go
// through the page cache and their writeback is started every 32 MiB with
// sync_file_range(2), waiting for the window before, so at most two windows
// are dirty. All-zero 64 KiB blocks are skipped, so raw images stay sparse.
// On success the file
// is fsynced, its size and digest checked (against the request's SHA256 when
// given), its real format probed with `qemu-img info` (the name and the
// request are never trusted; only raw and qcow2 without a backing or external
// data file are accepted), then the index record is written, the file is
// made 0444 and renamed to sha256/<hex>, and the directory is fsynced. The
// rename is the commit point: a crash before it leaves no entry (an index
// record without its file is dropped by Open), a crash after it leaves a
// complete, verified entry.
//
// A failed ingest leaves nothing behind. An interrupted one (every waiter
// cancelled, Close, or a crash) may leave a resumable partial in ingest/
// when the server gave a validator (strong ETag or Last-Modified) or the
// request gave a SHA256: the sidecar, written after an fdatasync of the data
// it covers, records the byte count and the marshalled sha256 state, so the
// next Ensure of the same request resumes with an HTTP Range request (with
// If-Range) without re-reading the prefix. Open removes everything else in
// ingest/ and partials older than Options.PartialMaxAge. Within one Ensure, a
// dropped stream is retried (resuming with Range when possible); a server
// that answers 200 instead of 206, or whose validator changed, makes the
// download start over. A stream counts as dropped on a network error, a body
// shorter than its length, or 60 s without data; retries back off from
// 250 ms, up to 10 attempts, or 4 in a row that made no progress. HTTP
// error statuses, TLS failures and redirect loops are not retried.
//
// Raw images are kept raw: overlays name their backing format with -F, so
// converting would only cost time and space.
//
// # Sharing, limits, errors
//
// Concurrent Ensure calls for the same request on the same pool share one
// download; a caller whose context ends leaves without disturbing the
// others, and the download is cancelled when the last one leaves. Distinct
// downloads run in parallel up to Options.MaxConcurrentDownloads.
//
// Images larger than Options.MaxImageBytes fail with image_download_failed
// (the remote object is unusable, the request itself was well-formed). Free
// space is checked before the download (Content-Length against free space
// minus Options.MinFreeBytes, after evicting what can be evicted) and after
// every buffer written; running out ends with disk_full and nothing left.
//
// # Pins and eviction
//
// CreateOverlay pins the entry for an owner (a VM uuid) in the entry's
// index record, so pins survive restarts; a pinned entry is never evicted.
// Pin does the same for an entry used without an overlay (a CD-ROM ISO);
// Unpin drops one owner's pin.
// After each ingest, and on Prune, least recently used unpinned entries are
// evicted while the pool's cache exceeds Options.MaxCacheBytes or its free
// space is under Options.MinFreeBytes (never the image just ingested).
// Before a download whose size is known, entries are evicted the same way,
// but only if that makes it fit: an image larger than the pool could ever
// hold (its file system's size less the floor) fails at once with
// disk_full, giving both sizes, and one that would not fit even after
// evicting every unpinned entry and idle partial fails with disk_full too;
// neither evicts anything. Cache sizes count allocated bytes. An entry that
// Ensure returned is not pinned until CreateOverlay or Pin: if eviction
// takes it in between (it would have to be the least recently used
// unpinned entry), CreateOverlay or Pin fails with not_found and the
// caller can Ensure again.
//
// The index record holds an entry's pins: if a record is lost (removed by
// hand), Open describes the file again from qemu-img, without pins.
package imagecache
